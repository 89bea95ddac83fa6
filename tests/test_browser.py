"How the browser tests get their Chromium on a machine without one (tests/browser.py): PATH, Playwright's own, then apt or `playwright install`."
import os, stat, sys
from pathlib import Path

import pytest

import browser


def script(folder:Path, name:str, body:str) -> Path:
    path = folder / name
    path.write_text('#!/bin/sh\n' + body + '\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def bare(tmp_path, monkeypatch):
    "A machine with no Chromium: PATH holds only a folder of ours, and Playwright's browser folder is empty."
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    monkeypatch.setenv('PATH', str(bin_dir))
    monkeypatch.setenv('PLAYWRIGHT_BROWSERS_PATH', str(tmp_path / 'ms-playwright'))
    return bin_dir


def test_install_commands():
    "Root with apt: Debian's package; anyone else: Playwright's own build (no root needed)."
    playwright = [sys.executable, '-m', 'playwright', 'install', 'chromium']
    assert browser.install_commands(root=True, apt=True) == [['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', 'chromium'], playwright]
    for root, apt in [(False, True), (True, False), (False, False)]:
        assert browser.install_commands(root, apt) == [playwright]


def test_found_on_path(bare):
    chromium = script(bare, 'chromium', 'exit 0')
    assert browser.chromium_executable() == str(chromium)


def test_nothing_found(bare):
    assert browser.on_path() is None and browser.playwright_own() is None


def test_installed_with_apt_when_root(bare, monkeypatch):
    "As root on a Debian machine without chromium: apt-get installs it, and the test command finds it."
    log = bare.parent / 'apt.log'
    script(bare, 'apt-get', f'echo "$@" >> {log}\n[ "$1" = install ] && printf "#!/bin/sh\\n" > {bare}/chromium && /bin/chmod +x {bare}/chromium\nexit 0')
    monkeypatch.setattr(os, 'geteuid', lambda: 0)
    assert browser.chromium_executable() == str(bare / 'chromium')
    assert log.read_text().splitlines() == ['update -qq', 'install -y -qq chromium']


def test_one_clear_line_when_nothing_works(bare, monkeypatch):
    "apt fails (no network, say), and so does Playwright's download: one line that says what was tried and how to get a browser."
    script(bare, 'apt-get', 'echo "E: Unable to locate package chromium" >&2; exit 100')
    monkeypatch.setattr(os, 'geteuid', lambda: 0)
    monkeypatch.setattr(browser.sys, 'executable', str(script(bare, 'python', 'echo "Error: Download failed: server returned code 403" >&2; exit 1')))
    with pytest.raises(RuntimeError, match=r"found none after trying `apt-get update -qq`: E: Unable to locate package chromium; .*"
                                           r"`python -m playwright install chromium`: Error: Download failed.*; install Debian's chromium"):
        browser.chromium_executable()

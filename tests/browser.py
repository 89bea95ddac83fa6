"""The Chromium that the browser tests drive, found or fetched by the test command itself, so that the README's
`pip install -e ".[dev]"` then `nbdev_test && pytest` pass on a fresh machine: Debian's `chromium` on PATH; else
Playwright's own Chromium, if installed; else one is installed, with apt (Debian's package) when this is root on
a machine with apt, or with `playwright install chromium` (Playwright's build, into the user's cache) elsewhere."""
import os, shutil, subprocess, sys
from pathlib import Path

NAMES = ('chromium', 'chromium-browser')


def on_path() -> str|None:
    "A Chromium on PATH."
    return next((p for p in map(shutil.which, NAMES) if p), None)


def playwright_own() -> str|None:
    "Playwright's own Chromium, where `playwright install chromium` has put it."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p: path = p.chromium.executable_path
    return path if Path(path).is_file() else None


def install_commands(root:bool, apt:bool) -> list[list[str]]:
    "How to get a Chromium here, in order of preference: Debian's package when root with apt, then Playwright's build."
    playwright = [sys.executable, '-m', 'playwright', 'install', 'chromium']
    if root and apt: return [['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', 'chromium'], playwright]
    return [playwright]


def chromium_executable() -> str:
    "The path of a Chromium to launch with Playwright, installing one if there is none (see the module's doc)."
    if found := on_path() or playwright_own(): return found
    env, tried = {**os.environ, 'DEBIAN_FRONTEND': 'noninteractive'}, []
    for command in install_commands(hasattr(os, 'geteuid') and os.geteuid() == 0, shutil.which('apt-get') is not None):
        print('no Chromium here; getting one:', *command, file=sys.stderr)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = (done.stderr or done.stdout).strip().splitlines() or [f'exit status {done.returncode}']
        last = next((l.strip() for l in reversed(lines) if 'rror' in l), lines[-1].strip())   # the error, not a trace's tail
        label = ' '.join('python' if c == sys.executable else c for c in command)
        tried.append(f"`{label}`: {last if done.returncode else 'done'}")
        if found := on_path() or playwright_own(): return found
    raise RuntimeError(f"the browser tests need Chromium and found none after trying {'; '.join(tried)}; "
                       "install Debian's chromium (apt-get install chromium) or run `playwright install chromium`")

"Process every notebook for the docs site as `nbdev_docs` does, without Quarto (not installable here)."
from pathlib import Path
import nbdev.doclinks
from nbdev.config import get_config
from nbdev.quarto import refresh_quarto_yml, nbdev_sidebar
from nbdev.serve import proc_nbs

def main():
    cfg = get_config()
    refresh_quarto_yml()
    nbdev.doclinks._build_modidx()
    nbdev_sidebar.__wrapped__(path=cfg.nbs_path)
    cache = proc_nbs(cfg.nbs_path, force=True, n_workers=2)
    notebooks = sorted(p.name for p in Path(cfg.nbs_path).glob('*.ipynb'))
    missing = [n for n in notebooks if not (cache / n).is_file()]
    if missing: raise SystemExit(f"docs: these notebooks were not processed: {', '.join(missing)}")
    print(f"docs: processed {len(notebooks)} notebooks into {cache}")

if __name__ == '__main__': main()  # proc_nbs starts worker processes with 'spawn', which re-imports this file

"""Take the README's picture of the served page: ``hierclass serve`` on a run, a real photo picked in
headless chromium (the browser test's code, tests/serve_browser.py), the page saved as a PNG.

    python docs/make_screenshot.py --run RUN --photo-from ../shared/data/fashion/val.bson --product 7

Needs selenium, Debian's chromium and chromium-driver.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serve_browser import classify_in_browser, missing, served  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the run to serve")
    parser.add_argument("--photo-from", type=Path, required=True, help="a dump to take the photos from")
    parser.add_argument("--product", type=int, default=0, help="the product row whose photos are picked")
    parser.add_argument("--out", type=Path, default=HERE / "serve.png")
    args = parser.parse_args()
    why = missing()
    if why:
        raise SystemExit(f"error: {why}")
    from hierclass.data import open_source

    source = open_source(args.photo_from, progress=False)
    photos = []
    for i, data in enumerate(source.read_images(args.product)):
        photo = Path("/tmp") / f"hierclass-screenshot-{i}.jpg"
        photo.write_bytes(data)
        photos.append(photo)
    with served(args.run) as server:
        ranked = classify_in_browser(server.url, photos, args.out, size=(1200, 940))
    for r in ranked:
        print(f"{r['percent']:>6}  {' > '.join(r['path'])}  ({r['category_id']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

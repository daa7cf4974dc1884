#!/usr/bin/env bash
# A real image-caption set for development: Debian's openclipart-svg (public-domain clip art,
# ~8,000 SVGs), each rasterized to PNG on white and captioned with its own metadata
# (dc:title, plus dc:description when it has 3+ words); byte-identical SVGs kept once. Writes DIR/images/*.png and
# DIR/captions.csv (filename,caption,split); split by md5(filename): 1 in 10 test, 1 in 10 val.
# Usage: scripts/openclipart-prep.sh [DIR] [SIZE]   (default DIR=data/openclipart, SIZE=224)
# Needs: apt-get (as root), python3. Takes ~5-10 min on 2 cores.
set -eu
. "$(dirname "$0")/debian-unpack.sh"
DIR=${1:-data/openclipart}; SIZE=${2:-224}
[[ -f $DIR/captions.csv ]] && { echo "$DIR ready ($(($(wc -l < "$DIR/captions.csv") - 1)) pairs)"; exit 0; }
mkdir -p "$DIR/deb" "$DIR/images"
command -v rsvg-convert >/dev/null || { apt-get install -y -qq librsvg2-bin >/dev/null 2>&1 || { apt-get update -qq >/dev/null; apt-get install -y -qq librsvg2-bin >/dev/null; }; }
unpack_deb openclipart-svg "$DIR"
python3 - "$DIR" "$SIZE" <<'PY'
import csv, glob, hashlib, html, os, re, subprocess, sys
from concurrent.futures import ThreadPoolExecutor
out, size = sys.argv[1], sys.argv[2]
root = os.path.join(out, "deb/x/usr/share/openclipart/svg/")
def meta(path):
    s = open(path, encoding="utf8", errors="ignore").read()
    t = re.search(r"<dc:title>([^<]*)</dc:title>", s)
    d = re.search(r"<dc:description>([^<]*)</dc:description>", s)
    clean = lambda x: " ".join(html.unescape(html.unescape(x)).split()) if x else ""
    title, desc = clean(t and t.group(1)), clean(d and d.group(1))
    return f"{title}. {desc}" if title and len(desc.split()) >= 3 else title
jobs, seen = [], set()
for svg in sorted(glob.glob(root + "**/*.svg", recursive=True)):
    digest = hashlib.md5(open(svg, "rb").read()).hexdigest()
    if digest in seen: continue  # the same drawing filed under several categories
    seen.add(digest)
    cap = meta(svg)
    if not cap or cap == "Open Clip Art Library": continue
    jobs.append((svg, os.path.relpath(svg, root)[:-4].replace("/", "__") + ".png", cap))
def render(job):
    svg, name, cap = job
    r = subprocess.run(["rsvg-convert", "-w", size, "-h", size, "--keep-aspect-ratio", "-b", "white",
                        svg, "-o", os.path.join(out, "images", name)], capture_output=True, timeout=60)
    return job if r.returncode == 0 else None
with ThreadPoolExecutor(os.cpu_count() or 2) as ex:
    rows = [j for j in ex.map(render, jobs) if j]
def split(name):
    h = int(hashlib.md5(name.encode()).hexdigest(), 16) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"
with open(os.path.join(out, "captions.csv"), "w", newline="") as f:
    w = csv.writer(f); w.writerow(["filename", "caption", "split"])
    w.writerows((name, cap, split(name)) for _, name, cap in rows)
print(f"{len(rows)} pairs ({len(jobs) - len(rows)} SVGs failed to render) -> {out}")
PY

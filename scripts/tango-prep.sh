#!/usr/bin/env bash
# A fourth small real image-caption folder, from Debian: the Tango icon theme (public domain), 32 px PNGs.
# Icons that are the same picture under several names (aliases) are one image; its captions are its names
# in words ("x-office-calendar" -> "x office calendar") and, once, its first name with the icon's category
# ("x office calendar (mimetypes)"); at most five per image. Writes DIR/images/<first name>.png and
# DIR/captions.csv (filename,caption) WITHOUT a split column. Usage: scripts/tango-prep.sh [DIR]
# (default DIR=data/tango). Needs apt-get download, dpkg, python3.
set -eu
. "$(dirname "$0")/debian-unpack.sh"
DIR=${1:-data/tango}
[[ -f $DIR/captions.csv ]] && { echo "$DIR ready ($(($(wc -l < "$DIR/captions.csv") - 1)) pairs)"; exit 0; }
mkdir -p "$DIR/deb" "$DIR/images"
unpack_deb tango-icon-theme "$DIR"
python3 - "$DIR" <<'PY'
import csv, glob, hashlib, os, shutil, sys
out = sys.argv[1]
groups = {}
for png in sorted(glob.glob(os.path.join(out, "deb/x/usr/share/icons/Tango/32x32/*/*.png"))):
    data = open(os.path.realpath(png), "rb").read()
    groups.setdefault(hashlib.sha1(data).hexdigest(), []).append(png)
rows = []
for key, pngs in sorted(groups.items(), key=lambda kv: os.path.basename(kv[1][0])):
    names = sorted({os.path.basename(p)[:-4] for p in pngs})
    words = lambda n: " ".join(n.replace("-", " ").replace("_", " ").split())
    category = os.path.basename(os.path.dirname(pngs[0]))
    caps = [f"{words(names[0])} ({category})"] + [words(n) for n in names]
    caps = list(dict.fromkeys(caps))[:5]
    fname = names[0] + ".png"
    shutil.copyfile(os.path.realpath(pngs[0]), os.path.join(out, "images", fname))
    rows += [(fname, c) for c in caps]
with open(os.path.join(out, "captions.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f); w.writerow(["filename", "caption"]); w.writerows(rows)
print(f"{len(rows)} captions of {len(groups)} images -> {out}")
PY

#!/usr/bin/env bash
# A third small real image-caption folder, from the npm registry: Twitter's Twemoji as 64 px RGBA PNGs
# (npm package emoji-datasource-twitter, CC-BY 4.0) with the names in its emoji.json. N emoji (default 400,
# a seeded sample of every category except skin-tone components), each with THREE captions: its Unicode
# name ("grinning face with smiling eyes"), its short names with its subcategory ("smile (face smiling)"),
# and its subcategory and category ("face smiling, smileys & emotion"). Writes DIR/images/<code>.png and DIR/captions.csv (filename,caption;
# one row per caption) WITHOUT a split column — the shape of the 400-icon folder in issue #28.
# Usage: scripts/emoji-prep.sh [DIR] [N]   (default DIR=data/emoji, N=400). Needs npm (or curl), python3.
set -eu
DIR=${1:-data/emoji}
N=${2:-400}
PKG=emoji-datasource-twitter-16.0.0.tgz
[[ -f $DIR/captions.csv ]] && { echo "$DIR ready ($(($(wc -l < "$DIR/captions.csv") - 1)) pairs)"; exit 0; }
mkdir -p "$DIR/pkg" "$DIR/images"
( cd "$DIR/pkg"
  [[ -f $PKG ]] || npm pack --silent emoji-datasource-twitter@16.0.0 >/dev/null 2>&1 || \
    curl -sSfLO "https://registry.npmjs.org/emoji-datasource-twitter/-/$PKG"
  [[ -d package ]] || tar xzf "$PKG" package/emoji.json package/img/twitter/64 )
python3 - "$DIR" "$N" <<'PY'
import csv, json, os, random, shutil, sys
out, n = sys.argv[1], int(sys.argv[2])
pkg = os.path.join(out, "pkg", "package")
items = [e for e in json.load(open(os.path.join(pkg, "emoji.json"), encoding="utf-8"))
         if e.get("has_img_twitter") and e["category"] != "Component"
         and os.path.isfile(os.path.join(pkg, "img", "twitter", "64", e["image"]))]
items.sort(key=lambda e: e["image"])
random.Random(0).shuffle(items)
rows = []
for e in items[:n]:
    shutil.copyfile(os.path.join(pkg, "img", "twitter", "64", e["image"]), os.path.join(out, "images", e["image"]))
    words = lambda s: " ".join(s.replace("_", " ").replace("-", " ").split()).lower()
    sub = words(e["subcategory"])
    caps = [words(e["name"]), f"{' / '.join(words(s) for s in e['short_names'])} ({sub})",
            f"{sub}, {e['category'].lower()}"]
    rows += [(e["image"], c) for c in caps]
with open(os.path.join(out, "captions.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f); w.writerow(["filename", "caption"]); w.writerows(rows)
print(f"{len(rows)} captions of {min(n, len(items))} images -> {out}")
PY

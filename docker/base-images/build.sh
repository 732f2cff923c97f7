#!/usr/bin/env bash
# Builds the images docker-compose.yml and the Dockerfile name, from Debian packages, on a Docker
# engine that reaches no image registry (the test machines): a Debian bookworm base made by
# mmdebstrap, then one image per folder here, tagged with the name in `images`. PostgreSQL, Redis,
# Prometheus and Python are Debian's; Grafana and mailpit are small stand-ins (see their folders).
#
# Usage: DOCKER_HOST=... docker/base-images/build.sh   (needs docker, mmdebstrap; run as root)
# Does nothing when the images exist and were built from the same files and CA certificates.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# The build host's extra CA certificates (what update-ca-certificates adds): without them in the
# image, apt and pip inside a build cannot reach the registries through a TLS-inspecting proxy.
extra_certs=/usr/local/share/ca-certificates
label=org.shop.base-images
docker=${DOCKER:-docker}  # the engine's own CLI when there are several

# Each image is rebuilt only when what it is made of changes: the base when this script or the
# certificates do, an image when the base or its own folder does.
hash_files() { LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -c1-16; }
base_key=$( (echo "$here/build.sh"; find "$extra_certs" -type f -name '*.crt' 2>/dev/null) | hash_files)
image_key() { (cd "$here" && find "$1" -type f ! -name '*.pyc' | hash_files | sed "s/^/$base_key-/"); }

built_with() {  # the key an image was built with, or nothing
  "$docker" image inspect --format "{{ index .Config.Labels \"$label\" }}" "$1" 2>/dev/null || true
}

if [ "$(built_with localhost/debian:bookworm)" != "$base_key" ]; then
  echo "mmdebstrap: Debian bookworm (minbase) -> localhost/debian:bookworm"
  mmdebstrap --quiet --variant=minbase --include=ca-certificates \
    --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\"" \
    --customize-hook="if ls $extra_certs/*.crt >/dev/null 2>&1; then cp $extra_certs/*.crt \"\$1/usr/local/share/ca-certificates/\"; fi" \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1' \
    bookworm - |
    "$docker" import --change "LABEL $label=$base_key" \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'CMD ["bash"]' - localhost/debian:bookworm >/dev/null
fi

built=0
while read -r folder tag; do
  key=$(image_key "$folder")
  [ "$(built_with "$tag")" = "$key" ] && continue
  echo "building $tag from $folder/"
  # The host's network: apt and pip reach the registries the way the host does.
  DOCKER_BUILDKIT=0 "$docker" build --quiet --network host --label "$label=$key" \
    --build-arg BASE=localhost/debian:bookworm -t "$tag" "$here/$folder" >/dev/null
  built=$((built + 1))
done < <(grep -v '^#' "$here/images" | awk 'NF == 2')
[ $built = 0 ] || "$docker" image prune --force >/dev/null  # the previous builds' layers, now untagged
echo "base images: $built built, the others up to date"

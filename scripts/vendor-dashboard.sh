#!/usr/bin/env bash
# Fetches the dashboard's two browser libraries from the npm registry (`npm pack`, pinned
# versions) and copies their browser builds and licenses into dashboard/static/vendor/,
# then checks them against dashboard/static/vendor/SHA256SUMS. Run it only to upgrade: the
# vendored files are committed, so `edgefleet dashboard` works offline from an install.
# To upgrade: change a version below, run this script with --update, review the diff.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

MQTT_VERSION=5.16.0
MSGPACK_VERSION=3.1.3
vendor=dashboard/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "mqtt@$MQTT_VERSION" "@msgpack/msgpack@$MSGPACK_VERSION" >/dev/null)
mkdir -p "$work/mqtt" "$work/msgpack"
tar xzf "$work/mqtt-$MQTT_VERSION.tgz" -C "$work/mqtt"
tar xzf "$work/msgpack-msgpack-$MSGPACK_VERSION.tgz" -C "$work/msgpack"

cp "$work/mqtt/package/dist/mqtt.min.js" "$vendor/mqtt.min.js"
cp "$work/mqtt/package/LICENSE.md" "$vendor/mqtt.LICENSE.md"
cp "$work/msgpack/package/dist.umd/msgpack.min.js" "$vendor/msgpack.min.js"
cp "$work/msgpack/package/LICENSE" "$vendor/msgpack.LICENSE.txt"

if [ "${1:-}" = "--update" ]; then
  (cd "$vendor" && sha256sum mqtt.min.js mqtt.LICENSE.md msgpack.min.js msgpack.LICENSE.txt > SHA256SUMS)
fi
(cd "$vendor" && sha256sum --check --quiet SHA256SUMS)
echo "vendored mqtt $MQTT_VERSION and @msgpack/msgpack $MSGPACK_VERSION into $vendor" >&2

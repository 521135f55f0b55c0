#!/usr/bin/env bash
# Re-downloads the pinned third-party packages the pages serve (api/ui/static/vendor/,
# whose README lists them) with `npm pack`, checks each tarball against its pinned
# integrity hash, and copies the files taken. A developer tool: nothing runs it at build
# time. To move to a new version, change its row below and in the README together.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENDOR="$HERE/static/vendor"

# name@version|integrity|target folder|files, relative to the package's root
PINS=(
  "markdown-it@15.0.3|sha512-+Az7Ojz3iRGu8KYMvJ6xVhvrxP3eE+vEtJX75Ow88XBpcQNV/0lGX5ZynIIBftREo4DC2jsveAMDaeltmm8QvQ==|markdown-it|dist/browser/markdown-it.esm.min.mjs LICENSE"
  "dompurify@3.5.0|sha512-LYC0ZkE8P1V42JsRYTwMdme/2ET8SpOc5AA2eOFjP/IadvRd2fwiT4TVz5vkfy0XUx12aS2UaRkTnfVPNOv9vw==|dompurify|dist/purify.es.mjs LICENSE LICENSE-MPL"
  "swagger-ui-dist@5.36.0|sha512-Lt6/Kb0gXmLdiabLhvso4VdJP9V7qJWB0zh0gzeXUV3+CMOTzMmvpJRSXN7EAjfwixwmoi9ezDbLHiexC7lA9A==|swagger-ui|swagger-ui-bundle.js swagger-ui-bundle.js.LICENSE.txt swagger-ui.css LICENSE NOTICE"
  "redoc@2.5.4|sha512-M6jWhG1qoBnH6TFmzJnstyCZ87HmOY/UzDm78mHiYihEdlV/YcS9ogOo1NlElnJMeLsyxHFe2yFc4sNjHTrABQ==|redoc|bundles/redoc.standalone.js bundles/redoc.standalone.js.LICENSE.txt LICENSE"
)

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

for pin in "${PINS[@]}"; do
  IFS='|' read -r spec integrity target files <<<"$pin"
  tarball="$(cd "$work" && npm pack --silent "$spec")"
  # npm's integrity is "sha512-" + the base64 SHA-512 of the tarball itself.
  actual="sha512-$(openssl dgst -sha512 -binary "$work/$tarball" | base64 -w0)"
  if [[ "$actual" != "$integrity" ]]; then
    echo "$spec: integrity $actual, pinned $integrity" >&2
    exit 1
  fi
  unpacked="$work/${tarball%.tgz}"
  mkdir -p "$unpacked"
  tar -xzf "$work/$tarball" -C "$unpacked"
  rm -rf "${VENDOR:?}/$target"
  mkdir -p "$VENDOR/$target"
  for file in $files; do
    cp "$unpacked/package/$file" "$VENDOR/$target/$(basename "$file")"
  done
  echo "$spec -> static/vendor/$target/"
done

# Replaces `from` with `to` in `file`, and fails unless `from` occurs there exactly once
# (a new version that moved it needs a fresh look, not a silent no-op).
patch_once() {
  local file="$1" from="$2" to="$3" count
  count="$(grep -oF -- "$from" "$file" | wc -l)"
  if [[ "$count" != 1 ]]; then
    echo "$file: '$from' occurs $count times, expected once" >&2
    exit 1
  fi
  FROM="$from" TO="$to" perl -pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/' "$file"
  echo "patched $(basename "$file"): $from -> $to"
}

# ReDoc's sidebar footer shows Redocly's logo from their CDN, the one file it would load
# from elsewhere (the page's policy blocks it, with a console error). With an empty src
# the image fails at once and ReDoc leaves it out; the "API docs by Redocly" link stays.
patch_once "$VENDOR/redoc/redoc.standalone.js" \
  'src:"https://cdn.redoc.ly/redoc/logo-mini.svg"' 'src:""'

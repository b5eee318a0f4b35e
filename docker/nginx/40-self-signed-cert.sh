#!/bin/sh
# Run by the nginx image's entrypoint before nginx starts (/docker-entrypoint.d). When no
# certificate is mounted in /etc/nginx/certs, make a self-signed one (ECDSA P-256, 825 days) for
# TLS_SERVER_NAME, localhost and 127.0.0.1, and keep it in the volume so clients can pin it.
# Real certificates: put fullchain.pem and privkey.pem in a directory and set TLS_CERT_DIR to it
# in docker/.env (README "Docker deployment"); this script then leaves them alone.
set -eu
dir=/etc/nginx/certs
name=${TLS_SERVER_NAME:-localhost}
if [ -s "$dir/fullchain.pem" ] && [ -s "$dir/privkey.pem" ]; then
  echo "$0: using the certificate in $dir"
  exit 0
fi
if ! command -v openssl >/dev/null 2>&1; then
  echo "$0: no certificate in $dir and no openssl to make one; mount fullchain.pem and privkey.pem" >&2
  exit 1
fi
case "$name" in
  *[!A-Za-z0-9.-]*) echo "$0: TLS_SERVER_NAME must be a DNS name, got '$name'" >&2; exit 1 ;;
esac
echo "$0: no certificate in $dir; making a self-signed one for $name (replace it for production)"
umask 077
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
  -subj "/CN=$name" \
  -addext "subjectAltName=DNS:$name,DNS:localhost,IP:127.0.0.1" \
  -addext "extendedKeyUsage=serverAuth" \
  -keyout "$dir/privkey.pem" -out "$dir/fullchain.pem" 2>/dev/null
chmod 644 "$dir/fullchain.pem"

#!/usr/bin/env bash
# Make a CA and one certificate/key it signed, for the cluster's TLS (Dask's TLS is mutual:
# the scheduler, the workers and the clients all present a certificate of the same CA).
#
#   deploy/tls/make-certs.sh DIR [--host IP_OR_NAME]... [--days N]
#
# writes DIR/ca.pem, DIR/cert.pem and DIR/key.pem (key readable by its owner only); the
# certificate names 127.0.0.1 and localhost unless --host is given.  Give all three files
# to every process: --tls-ca-file DIR/ca.pem --tls-cert DIR/cert.pem --tls-key DIR/key.pem.
# Needs the Python package `cryptography` (pip install cryptography).
set -euo pipefail
PYTHON=${PYTHON:-python3}
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ))
fi
exec "$PYTHON" -m glinthawk_dask.runtime.tls "$@"

#!/usr/bin/env bash
# Makes the test certificates of tests/tls.rs and tests/example_chat_tls.rs (see README.md).
set -euo pipefail
cd "$(dirname "$0")"
ec="-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
# The test CA, and a CA nobody trusts (a certificate from it is refused).
openssl req -x509 $ec -days 36500 -subj "/CN=proactor test CA" -keyout ca.key -out ca.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
openssl req -x509 $ec -days 36500 -subj "/CN=proactor untrusted CA" -keyout other-ca.key -out other-ca.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
# The server's certificate, for localhost and 127.0.0.1, from each CA.
leaf() { # CA-NAME OUT-NAME
  openssl req -new $ec -subj "/CN=localhost" -keyout "$2.key" -out "$2.csr"
  printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth,clientAuth" > "$2.ext"
  openssl x509 -req -in "$2.csr" -CA "$1.pem" -CAkey "$1.key" -CAcreateserial -days 36500 \
    -extfile "$2.ext" -out "$2.pem"
  rm "$2.csr" "$2.ext"
}
leaf ca server
leaf other-ca untrusted
rm -f ./*.srl

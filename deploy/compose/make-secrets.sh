#!/bin/sh
# Make the files compose.secure.yaml mounts, for a demo: a CA, one server certificate for the compose hosts
# (serve, daemon, localhost), a client certificate for Prometheus and curl, and a random bearer token.
# In production use your own PKI and secret store. Usage: make-secrets.sh DIR
set -eu
dir=${1:?usage: make-secrets.sh DIR}
mkdir -p "$dir" && cd "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 365 -subj "/CN=unlearnd demo CA" 2>/dev/null
printf 'subjectAltName=DNS:serve,DNS:daemon,DNS:localhost,IP:127.0.0.1\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
for name in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=unlearnd $name" 2>/dev/null
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$name.pem" -days 365 \
    -extfile "$name.ext" 2>/dev/null
done
openssl rand -hex 32 > token
rm -f ca.key ca.srl ./*.csr ./*.ext      # the CA signs nothing more here
# the containers run as another user than the one making the files: readable by all, in a folder only you list
chmod 0644 token server.key client.key
echo "wrote $(pwd): ca.pem server.pem server.key client.pem client.key token"

#!/usr/bin/env bash
# Services the test suite needs that pip cannot provide: the OpenSSH server and client used by
# tests/remote (a real sshd on 127.0.0.1, started and stopped by the tests themselves).
# The CI machine runs as root with Debian's package registry reachable. Installs only what is missing;
# does not start or enable any service (the policy-rc.d of CI images refuses that anyway).
set -euo pipefail

missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)

if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2046  # de-duplicated package names, no spaces
  apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u)
fi

mkdir -p /run/sshd  # sshd's privilege-separation directory; tests run sshd -D -f CONFIG themselves
/usr/sbin/sshd -V 2>&1 | head -n 1 || ssh -V

#!/usr/bin/env bash
# Start a user-level sshd on SSH_PORT (default 2222) so the DeepSpeed pdsh launcher can reach this
# node as the non-root user. All nodes mount the same SSH_DIR (a volume or shared directory).
#
# Host keys are per cluster: the first node to start generates one host key and one user key in
# SSH_DIR; every node serves that host key and pins it in known_hosts (under the alias moga-cluster)
# with StrictHostKeyChecking yes. A peer that does not hold the cluster's key is refused. Per-container
# keys would have to be collected after start-up, and collecting them with ssh-keyscan trusts
# whatever answers first, which is no better than not checking; containers are recreated at will,
# so a key per cluster (one SSH_DIR = one cluster; delete it to rotate) is the one that can be pinned.
set -euo pipefail
SSH_PORT=${SSH_PORT:-2222}
SSH_DIR=${SSH_DIR:-/opt/moga_dist/.ssh-shared}
SSH_LISTEN=${SSH_LISTEN:-0.0.0.0}       # e.g. 127.0.0.2: several nodes on one host's loopback
mkdir -p "$SSH_DIR" "$HOME/.ssh"
# Nodes start together: the lock makes exactly one of them generate the keys.
(
  flock 9
  [[ -f "$SSH_DIR/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -C moga-cluster-host -f "$SSH_DIR/host_ed25519"
  [[ -f "$SSH_DIR/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -C moga-cluster-user -f "$SSH_DIR/id_ed25519"
) 9> "$SSH_DIR/.keygen.lock"
cp "$SSH_DIR/id_ed25519" "$SSH_DIR/id_ed25519.pub" "$HOME/.ssh/"
cp "$SSH_DIR/id_ed25519.pub" "$HOME/.ssh/authorized_keys"
echo "moga-cluster $(cat "$SSH_DIR/host_ed25519.pub")" > "$HOME/.ssh/known_hosts"
chmod 700 "$HOME/.ssh" && chmod 600 "$HOME/.ssh/id_ed25519" "$HOME/.ssh/authorized_keys"
printf 'Host *\n  Port %s\n  HostKeyAlias moga-cluster\n  StrictHostKeyChecking yes\n  UserKnownHostsFile %s\n' \
  "$SSH_PORT" "$HOME/.ssh/known_hosts" > "$HOME/.ssh/config"
cat > "$HOME/.ssh/sshd_config" <<CFG
Port $SSH_PORT
ListenAddress $SSH_LISTEN
HostKey $SSH_DIR/host_ed25519
PidFile $HOME/.ssh/sshd.pid
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
AuthorizedKeysFile $HOME/.ssh/authorized_keys
CFG
exec /usr/sbin/sshd -D -e -f "$HOME/.ssh/sshd_config"

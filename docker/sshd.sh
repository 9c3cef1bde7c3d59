#!/usr/bin/env bash
# Start a user-level sshd on SSH_PORT (default 2222) so the DeepSpeed pdsh launcher can reach this
# node as the non-root user; all nodes share SSH_DIR (a volume) for host and user keys.
set -euo pipefail
SSH_PORT=${SSH_PORT:-2222}
SSH_DIR=${SSH_DIR:-/opt/moga_dist/.ssh-shared}
mkdir -p "$SSH_DIR" "$HOME/.ssh"
[[ -f "$SSH_DIR/host_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -f "$SSH_DIR/host_ed25519"
[[ -f "$SSH_DIR/id_ed25519" ]] || ssh-keygen -q -t ed25519 -N "" -f "$SSH_DIR/id_ed25519"
cp "$SSH_DIR/id_ed25519" "$SSH_DIR/id_ed25519.pub" "$HOME/.ssh/"
cp "$SSH_DIR/id_ed25519.pub" "$HOME/.ssh/authorized_keys"
chmod 700 "$HOME/.ssh" && chmod 600 "$HOME/.ssh/id_ed25519" "$HOME/.ssh/authorized_keys"
printf 'Host *\n  Port %s\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n' "$SSH_PORT" > "$HOME/.ssh/config"
cat > "$SSH_DIR/sshd_config" <<CFG
Port $SSH_PORT
HostKey $SSH_DIR/host_ed25519
PidFile $SSH_DIR/sshd-$(hostname).pid
UsePAM no
PasswordAuthentication no
AuthorizedKeysFile $HOME/.ssh/authorized_keys
CFG
exec /usr/sbin/sshd -D -e -f "$SSH_DIR/sshd_config"

# Shell functions the scripts share: source it after cd-ing to the repo.

# wait_port PORT: waits for something to listen on 127.0.0.1:PORT, up to
# $wait_tries × 0.1 s (100: 10 s); on a timeout says so, with $wait_hint
# if set, and fails.
wait_port() {
  for _ in $(seq "${wait_tries:-100}"); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$(basename "$0" .sh): nothing listens on $1${wait_hint:+; $wait_hint}" >&2
  return 1
}

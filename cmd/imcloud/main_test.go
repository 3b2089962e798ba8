package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
	"imcloud/stages/logic/token"
)

func runCmd(t *testing.T, environ []string, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := run(context.Background(), args, &out, &errb, environ)
	return out.String(), errb.String(), err
}

func TestToken(t *testing.T) {
	out, _, err := runCmd(t, []string{"IMCLOUD_LOGIC__AUTH__JWT_SECRET=s3"}, "token", "--mid", "9", "--rooms", "live://1,live://2", "--accepts", "1000,1001", "--key", "k9")
	if err != nil {
		t.Fatal(err)
	}
	a, err := token.NewAuthenticator(config.Auth{Mode: config.AuthJWT, JWTSecret: "s3"})
	if err != nil {
		t.Fatal(err)
	}
	id, err := a.Authenticate([]byte(strings.TrimSpace(out)))
	if err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	if id.Mid != 9 || id.Key != "k9" || len(id.Rooms) != 2 || len(id.Accepts) != 2 || id.Recover {
		t.Fatalf("token identity %+v", id)
	}
	out, _, err = runCmd(t, []string{"IMCLOUD_LOGIC__AUTH__JWT_SECRET=s3"}, "token", "--mid", "9", "--recover")
	if err != nil {
		t.Fatal(err)
	}
	if id, err = a.Authenticate([]byte(strings.TrimSpace(out))); err != nil || !id.Recover {
		t.Fatalf("--recover token: identity %+v, err %v; want Recover", id, err)
	}
}

func TestCommandErrors(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("[cloud]\nheartbeat_interval = 30\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no command", nil, "no command"},
		{"unknown command", []string{"serve"}, "unknown command"},
		{"token without mid", []string{"token"}, "--mid"},
		{"token without secret", []string{"token", "--mid", "1"}, "secret"},
		{"token room not type://id", []string{"token", "--mid", "1", "--rooms", "lobby"}, `--rooms: "lobby"`},
		{"token room with a space", []string{"token", "--mid", "1", "--rooms", "live://a b"}, "--rooms"},
		{"token room with an inner '*'", []string{"token", "--mid", "1", "--rooms", "live://*/x"}, "--rooms"},
		{"token room too long", []string{"token", "--mid", "1", "--rooms", "live://" + strings.Repeat("x", 200)}, "--rooms"},
		{"token key with a space", []string{"token", "--mid", "1", "--key", "a b"}, "--key"},
		{"check names the bad key", []string{"check", "--config", bad}, "heartbeat_interval"},
		{"check missing file", []string{"check", "--config", filepath.Join(dir, "none.toml")}, "none.toml"},
		{"unknown flag", []string{"run", "--nope"}, "nope"},
		{"poison without action", []string{"poison"}, "list, replay, purge"},
		{"check refuses an open push API", []string{"check", "--set", "logic.auth.jwt_secret=x"}, "logic.allow_anonymous"},
		{"check refuses open internal gRPC", []string{"check", "--set", "logic.auth.jwt_secret=x", "--set", "logic.api_keys=0123456789abcdef-key", "--set", "cloud.grpc_addr=:3109"}, "cluster.secret"},
		{"standalone with another broker", []string{"standalone", "--set", "broker.kind=amqp"}, "imcloud run"},
		{"standalone with the Redis registry", []string{"standalone", "--set", "registry.kind=redis"}, "imcloud run"},
		{"anonymous standalone beyond loopback", []string{"standalone", "--anonymous", "--set", "logic.http_addr=0.0.0.0:0"}, "logic.allow_anonymous"},
		{"poison on the embedded broker without --admin", []string{"poison", "list", "--set", "broker.kind=gochannel"}, "--admin"},
		{"poison replay of nothing chosen", []string{"poison", "replay"}, "--id or --all"},
		{"poison purge with both", []string{"poison", "purge", "--all", "--id", "x"}, "one of --key, --id or --all"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := runCmd(t, nil, tt.args...)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want one mentioning %q", err, tt.want)
			}
		})
	}
}

// TestCheckRefusesJobWorstCase: a 30s job.timeout with the default
// retries keeps a message up to 4m19.2s, past cloud.dedupe_ttl and, on
// NATS, past the broker's redelivery window; check refuses it, naming the
// keys and the numbers.
func TestCheckRefusesJobWorstCase(t *testing.T) {
	valid := []string{"--set", "logic.auth.jwt_secret=x", "--set", "logic.api_keys=0123456789abcdef-key"}
	tests := []struct {
		name string
		sets []string
		want []string
	}{
		{"amqp", []string{"--set", "job.timeout=30s"}, []string{"worst case 4m19.2s", "job.timeout 30s × 6 attempts", "job.retry.*", "job.offline_grace", "cloud.dedupe_ttl 2m0s"}},
		{"nats", []string{"--set", "job.timeout=30s", "--set", "broker.kind=nats"}, []string{"worst case 4m19.2s", "broker.nats.redeliver_after 2m0s", "cloud.dedupe_ttl 2m0s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := runCmd(t, nil, append(append([]string{"check"}, valid...), tt.sets...)...)
			if err == nil {
				t.Fatal("check accepted job.timeout=30s with the default retries")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
}

func TestCheckAndVersion(t *testing.T) {
	out, _, err := runCmd(t, nil, "check", "--config", "../../config.example.toml", "--set", "logic.auth.jwt_secret=x", "--set", "logic.api_keys=0123456789abcdef-key")
	if err != nil || !strings.Contains(out, "ok") {
		t.Fatalf("check example: %q %v", out, err)
	}
	out, _, err = runCmd(t, nil, "version")
	if err != nil || !strings.HasPrefix(out, "imcloud ") {
		t.Fatalf("version: %q %v", out, err)
	}
	for _, c := range []string{"standalone", "run", "token", "check"} {
		_, errOut, _ := runCmd(t, nil, c, "--help")
		if !strings.Contains(errOut, "--config") {
			t.Errorf("%s --help does not list --config:\n%s", c, errOut)
		}
	}
}

// TestCheckWarns: check prints what a valid configuration exposes on purpose.
func TestCheckWarns(t *testing.T) {
	out, _, err := runCmd(t, nil, "check", "--set", "logic.auth.jwt_secret=x", "--set", "logic.allow_anonymous=true",
		"--set", "cluster.secret=0123456789abcdef", "--set", "logic.grpc_addr=:3119", "--set", "admin.addr=:6060")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"warning: logic.http_addr", "cluster.secret travels in clear", "warning: admin.addr", "configuration ok"} {
		if !strings.Contains(out, want) {
			t.Errorf("check output lacks %q:\n%s", want, out)
		}
	}
}

// TestStandaloneAnonymous: standalone --anonymous takes pushes without an
// API key, as goim's tools send them, and says so; the default still
// generates a key that a push without one lacks.
func TestStandaloneAnonymous(t *testing.T) {
	for _, tt := range []struct {
		name  string
		flags []string
		want  int
	}{
		{"anonymous", []string{"--anonymous"}, http.StatusOK},
		{"default", nil, http.StatusUnauthorized},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			var out, errb logtest.Buffer
			done := make(chan error, 1)
			args := append([]string{"standalone",
				"--set", "logic.http_addr=127.0.0.1:0", "--set", "logic.grpc_addr=127.0.0.1:0",
				"--set", "cloud.tcp_addr=127.0.0.1:0", "--set", "cloud.ws_addr=127.0.0.1:0", "--set", "cloud.grpc_addr=127.0.0.1:0",
				"--set", "log.level=warn"}, tt.flags...)
			go func() { done <- run(ctx, args, &out, &errb, nil) }()
			defer func() {
				cancel()
				if err := <-done; err != nil {
					t.Errorf("standalone: %v", err)
				}
			}()
			re := regexp.MustCompile(`logic http\s+(\S+)`)
			deadline := time.Now().Add(10 * time.Second)
			for !strings.Contains(out.String(), "Push to the room") {
				if time.Now().After(deadline) {
					t.Fatalf("no welcome screen; stdout:\n%s\nstderr:\n%s", out.String(), errb.String())
				}
				time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
			}
			welcome := out.String()
			if tt.want == http.StatusOK && !strings.Contains(welcome, "No API key") {
				t.Errorf("welcome does not say the push API is keyless:\n%s", welcome)
			}
			addr := re.FindStringSubmatch(welcome)[1]
			resp, err := http.Post("http://"+addr+"/goim/push/mids?operation=1000&mids=1", "text/plain", strings.NewReader("hello"))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Fatalf("push without Authorization: %d, want %d", resp.StatusCode, tt.want)
			}
		})
	}
}

// TestBenchRunsTheLoadGenerator: the load generator is its own binary;
// "imcloud bench" runs the imcloud-bench found on PATH (or beside imcloud)
// with its arguments and exit status, and says how to build it when there
// is none.
func TestBenchRunsTheLoadGenerator(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	t.Setenv("PATH", dir)
	_, _, err = runCmd(t, nil, "bench", "push")
	if err == nil || !strings.Contains(err.Error(), "make build") {
		t.Fatalf("without imcloud-bench: %v, want an error saying how to build it", err)
	}
	bin := filepath.Join(dir, benchCommand)
	out, buildErr := exec.Command(goBin, "build", "-o", bin, "../imcloud-bench").CombinedOutput()
	if buildErr != nil {
		t.Fatalf("build imcloud-bench: %v\n%s", buildErr, out)
	}
	_, stderr, err := runCmd(t, nil, "bench", "no-such-mode")
	var code exitCode
	if !errors.As(err, &code) || code != 1 || !strings.Contains(stderr, `unknown mode "no-such-mode"`) {
		t.Fatalf("imcloud bench no-such-mode: err %v, stderr %q; want imcloud-bench's exit status 1 and its message", err, stderr)
	}
}

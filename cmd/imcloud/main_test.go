package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imcloud/config"
	"imcloud/stages/logic"
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
	a, err := logic.NewAuthenticator(config.Auth{Mode: config.AuthJWT, JWTSecret: "s3"})
	if err != nil {
		t.Fatal(err)
	}
	id, err := a.Authenticate([]byte(strings.TrimSpace(out)))
	if err != nil {
		t.Fatalf("token does not verify: %v", err)
	}
	if id.Mid != 9 || id.Key != "k9" || len(id.Rooms) != 2 || len(id.Accepts) != 2 {
		t.Fatalf("token identity %+v", id)
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
		{"check names the bad key", []string{"check", "--config", bad}, "heartbeat_interval"},
		{"check missing file", []string{"check", "--config", filepath.Join(dir, "none.toml")}, "none.toml"},
		{"unknown flag", []string{"run", "--nope"}, "nope"},
		{"poison without action", []string{"poison"}, "list, replay, purge"},
		{"poison on the embedded broker", []string{"poison", "list", "--set", "broker.kind=gochannel"}, "amqp"},
		{"poison replay of nothing chosen", []string{"poison", "replay"}, "--id or --all"},
		{"poison purge with both", []string{"poison", "purge", "--all", "--id", "x"}, "not both"},
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

func TestCheckAndVersion(t *testing.T) {
	out, _, err := runCmd(t, nil, "check", "--config", "../../config.example.toml", "--set", "logic.auth.jwt_secret=x")
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

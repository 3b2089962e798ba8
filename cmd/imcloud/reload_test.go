package main

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"imcloud/pipeline/logtest"
	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// TestSIGHUPRotatesKeys: SIGHUP reloads the configuration file: a new JWT
// secret applies to the next connections while existing ones stay up,
// the old secret is refused, a new API key replaces the old one, and a
// change that needs a restart is named, not applied.
func TestSIGHUPRotatesKeys(t *testing.T) {
	const (
		oldSecret = "old-secret-0123456789abcdef0123456789"
		newSecret = "new-secret-0123456789abcdef0123456789"
		oldKey    = "old-api-key-0123456789"
		newKey    = "new-api-key-0123456789"
	)
	dir := t.TempDir()
	file := filepath.Join(dir, "imcloud.toml")
	write := func(secret, key, sendQueue string) {
		t.Helper()
		conf := "[logic]\napi_keys = [\"" + key + "\"]\n[logic.auth]\njwt_secret = \"" + secret + "\"\n[cloud]\nsend_queue = " + sendQueue + "\n"
		if err := os.WriteFile(file, []byte(conf), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(oldSecret, oldKey, "1024")
	ctx, cancel := context.WithCancel(context.Background())
	var out, errb logtest.Buffer
	done := make(chan error, 1)
	args := []string{"standalone", "--config", file,
		"--set", "logic.http_addr=127.0.0.1:0", "--set", "logic.grpc_addr=127.0.0.1:0",
		"--set", "cloud.tcp_addr=127.0.0.1:0", "--set", "cloud.ws_addr=127.0.0.1:0", "--set", "cloud.grpc_addr=127.0.0.1:0"}
	go func() { done <- run(ctx, args, &out, &errb, nil) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("standalone: %v", err)
		}
	})
	waitFor(t, &out, "Push to the room", &errb)
	api := regexp.MustCompile(`logic http\s+(\S+)`).FindStringSubmatch(out.String())[1]
	ws := "ws://" + regexp.MustCompile(`cloud ws\s+(\S+)`).FindStringSubmatch(out.String())[1] + "/sub"

	connect := func(secret string, mid int64) (*client.Conn, error) {
		t.Helper()
		dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer dcancel()
		c, err := client.Dial(dctx, ws, client.Options{})
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		tok, err := token.Sign(secret, token.Claims{Mid: mid}, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Auth([]byte(tok)); err != nil {
			_ = c.Close()
			return nil, err
		}
		t.Cleanup(func() { _ = c.Close() })
		return c, nil
	}
	push := func(key string, mid string) int {
		t.Helper()
		req, _ := http.NewRequest("POST", "http://"+api+"/im/push/mids?operation=1000&mids="+mid, strings.NewReader("after the reload"))
		req.Header.Set("Authorization", "Bearer "+key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		return res.StatusCode
	}

	before, err := connect(oldSecret, 1)
	if err != nil {
		t.Fatalf("old secret before the reload: %v", err)
	}
	write(newSecret, newKey, "2048")
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitFor(t, &errb, "configuration reloaded", &out)
	log := errb.String()
	for _, want := range []string{"logic.api_keys", "logic.auth.jwt_secret", "cloud.send_queue"} {
		if !strings.Contains(log, want) {
			t.Errorf("the reload's log does not name %s:\n%s", want, log)
		}
	}
	if strings.Contains(log, newSecret) || strings.Contains(log, newKey) {
		t.Error("the reload logged a secret")
	}
	if _, err := connect(newSecret, 2); err != nil {
		t.Fatalf("new secret after the reload: %v", err)
	}
	if _, err := connect(oldSecret, 3); err == nil || client.CloseCode(err) != 4401 {
		t.Fatalf("old secret after the reload: %v (code %d), want 4401", err, client.CloseCode(err))
	}
	if code := push(oldKey, "1"); code != http.StatusUnauthorized {
		t.Fatalf("old API key after the reload: %d, want 401", code)
	}
	if code := push(newKey, "1"); code != http.StatusOK {
		t.Fatalf("new API key after the reload: %d, want 200", code)
	}
	// The connection made with the old secret is still up and served.
	for {
		p, err := before.Read()
		if err != nil {
			t.Fatalf("the connection from before the reload: %v", err)
		}
		if p.Op == 1000 {
			if string(p.Body) != "after the reload" {
				t.Fatalf("got %q", p.Body)
			}
			break
		}
	}
}

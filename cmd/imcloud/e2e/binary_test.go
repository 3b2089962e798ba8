package e2e

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"imcloud/proto/client"
)

// buildBinary builds cmd/imcloud into a temporary directory.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "imcloud")
	out, err := exec.Command("go", "build", "-o", bin, "..").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestStandaloneBinary is the newcomer's path: start `imcloud standalone`,
// get a token from `imcloud token`, connect, push over HTTP, see it arrive.
func TestStandaloneBinary(t *testing.T) {
	bin := buildBinary(t)
	const secret = "binary-test-secret"
	cmd := exec.Command(bin, "standalone",
		"--set", "logic.http_addr=127.0.0.1:0", "--set", "logic.grpc_addr=127.0.0.1:0",
		"--set", "cloud.tcp_addr=127.0.0.1:0", "--set", "cloud.ws_addr=127.0.0.1:0", "--set", "cloud.grpc_addr=127.0.0.1:0",
		"--set", "logic.auth.jwt_secret="+secret)
	cmd.Env = append(os.Environ(), "IMCLOUD_LOG__LEVEL=warn")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = newTestWriter(t)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
	})

	// Read the welcome screen up to the example pushes.
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var welcome strings.Builder
	deadline := time.After(wait)
	for !strings.Contains(welcome.String(), "Clients connect to") {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("standalone exited; it printed:\n%s", welcome.String())
			}
			welcome.WriteString(l + "\n")
		case <-deadline:
			t.Fatalf("no welcome screen within %s; got:\n%s", wait, welcome.String())
		}
	}
	go func() {
		for range lines {
		}
	}()
	find := func(re string) string {
		m := regexp.MustCompile(re).FindStringSubmatch(welcome.String())
		if m == nil {
			t.Fatalf("welcome screen lacks %s:\n%s", re, welcome.String())
		}
		return m[1]
	}
	httpAddr := find(`logic http\s+(\S+)`)
	wsAddr := find(`cloud ws\s+(\S+)`)
	apiKey := find(`API key: (\S+)`)
	find(`Client token[^\n]*\n\s+(\S+)`)

	out, err := exec.Command(bin, "token", "--mid", "7", "--rooms", "live://1", "--accepts", "1000,1001", "--set", "logic.auth.jwt_secret="+secret).Output()
	if err != nil {
		t.Fatalf("imcloud token: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := client.Dial(ctx, "ws://"+wsAddr+"/sub", client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(wait))
	if _, err := c.Auth([]byte(strings.TrimSpace(string(out)))); err != nil {
		t.Fatalf("auth with imcloud token's token: %v", err)
	}

	req, _ := http.NewRequest(http.MethodPost, "http://"+httpAddr+"/im/push/mids?operation=1000&mids=7", strings.NewReader("hello from curl"))
	req.Header.Set("Authorization", "Bearer "+apiKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("push: %d %s", resp.StatusCode, body)
	}
	expect(t, "websocket client", c, 1000, "hello from curl")

	// SIGTERM is a clean stop.
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := expectClosed(t, "client at shutdown", c); client.CloseCode(err) != 1001 {
		t.Fatalf("client closed with %v, want 1001", err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("standalone exited with %v after SIGTERM, want 0", err)
		}
		exited <- nil
	case <-time.After(wait):
		t.Fatal("standalone still running after SIGTERM")
	}
}

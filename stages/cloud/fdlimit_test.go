//go:build linux

package cloud

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/proto/client"
)

// fdLimitEnv makes the test binary, run for TestAcceptAtDescriptorLimit,
// a cloud node whose descriptor limit is its value.
const fdLimitEnv = "IMCLOUD_CLOUD_TEST_FD_LIMIT"

// emfileListener reports on out the first time accepting fails for want
// of descriptors.
type emfileListener struct {
	net.Listener
	out  io.Writer
	seen atomic.Bool
}

func (l *emfileListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if errors.Is(err, syscall.EMFILE) && l.seen.CompareAndSwap(false, true) {
		fmt.Fprintln(l.out, "emfile")
	}
	return c, err
}

// A node at its descriptor limit keeps serving: unauthenticated clients
// that fill every descriptor hold up accepting only until they leave or
// their handshake times out. On main 4773376 the first EMFILE ended
// ServeTCP and the node stopped (1,100 connections under a 1,024 limit).
// The node runs in a child process with a limit of 48 descriptors; this
// process opens 120 connections to it.
func TestAcceptAtDescriptorLimit(t *testing.T) {
	if spec := os.Getenv(fdLimitEnv); spec != "" {
		runAtDescriptorLimit(t, spec)
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestAcceptAtDescriptorLimit$")
	cmd.Env = append(os.Environ(), fdLimitEnv+"=48")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stdin.Close(); _ = cmd.Wait() })
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	next := func(what string) string {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("node process ended waiting for %s", what)
			}
			return l
		case <-time.After(wait):
			t.Fatalf("timed out waiting for %s", what)
		}
		return ""
	}
	addr := strings.TrimPrefix(next("the node's address"), "addr ")

	var held []net.Conn
	defer func() {
		for _, c := range held {
			_ = c.Close()
		}
	}()
	for range 120 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, c)
	}
	if l := next("the node to run out of descriptors"); l != "emfile" {
		t.Fatalf("node said %q", l)
	}
	for _, c := range held {
		_ = c.Close()
	}
	held = nil

	// The connections that waited in the backlog are accepted and end;
	// then a new client gets in.
	deadline := time.Now().Add(wait)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := dialAuth(ctx, addr)
		cancel()
		if err == nil {
			_ = c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no client got in after the descriptors were freed: %v", err)
		}
	}
	select {
	case l, ok := <-lines:
		if ok {
			t.Fatalf("node said %q", l)
		}
		t.Fatal("node process ended")
	default:
	}
}

func runAtDescriptorLimit(t *testing.T, spec string) {
	var limit uint64
	if _, err := fmt.Sscan(spec, &limit); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, func(c *config.Cloud) { c.HandshakeTimeout = time.Second })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: limit, Max: limit}); err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- n.st.ServeTCP(&emfileListener{Listener: ln, out: os.Stdout}) }()
	fmt.Println("addr", ln.Addr())
	stdinClosed := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		close(stdinClosed)
	}()
	select {
	case err := <-served:
		fmt.Println("serving ended:", err)
	case <-stdinClosed:
	}
	_ = ln.Close()
}

// dialAuth connects to target and authenticates as mid 1 within ctx.
func dialAuth(ctx context.Context, target string) (*client.Conn, error) {
	c, err := client.Dial(ctx, target, client.Options{})
	if err != nil {
		return nil, err
	}
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetReadDeadline(d)
	}
	if _, err := c.Auth([]byte(`{"mid":1}`)); err != nil {
		_ = c.Close()
		return nil, err
	}
	return c, nil
}

// capLimitEnv makes the test binary, run for
// TestConnCapKeepsPushAPIAtDescriptorLimit, a cloud node and a push API
// whose descriptor limit is its value.
const capLimitEnv = "IMCLOUD_CLOUD_TEST_CAP_LIMIT"

// With cloud.max_conns derived from the descriptor limit, an attacker
// holding as many connections as it can (authenticated with one token's
// claims, and more that never authenticate) leaves the descriptors the
// rest of the process needs: the push API, an HTTP server in the same
// process, still answers and reaches every client. On main 4773376, 182
// connections under a 200 limit left the push API without an answer.
// The node runs in a child process with a limit of 128 descriptors, so
// its cap is 128 - 64 = 64; this process opens 200 connections to it.
func TestConnCapKeepsPushAPIAtDescriptorLimit(t *testing.T) {
	if spec := os.Getenv(capLimitEnv); spec != "" {
		runCapAtDescriptorLimit(t, spec)
		return
	}
	const limit, wantCap = 128, 64
	cmd := exec.Command(os.Args[0], "-test.run=^TestConnCapKeepsPushAPIAtDescriptorLimit$")
	cmd.Env = append(os.Environ(), fmt.Sprint(capLimitEnv, "=", limit))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = stdin.Close(); _ = cmd.Wait() })
	sc := bufio.NewScanner(stdout)
	var addr, pushURL string
	var maxConns int
	for addr == "" || pushURL == "" || maxConns == 0 {
		if !sc.Scan() {
			t.Fatalf("node process ended before saying where it listens: %v", sc.Err())
		}
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		switch f[0] {
		case "addr":
			addr = f[1]
		case "push":
			pushURL = f[1]
		case "max_conns":
			_, _ = fmt.Sscan(f[1], &maxConns)
		}
	}
	if maxConns != wantCap {
		t.Fatalf("cap derived from a limit of %d is %d, want %d", limit, maxConns, wantCap)
	}

	// Every connection is held: one the garbage collector finalized
	// would close and free its place.
	var held []*client.Conn
	defer func() {
		for _, c := range held {
			_ = c.Close()
		}
	}()
	authenticated := 0
	for i := range 200 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := client.Dial(ctx, addr, client.Options{})
		cancel()
		if err != nil {
			continue // refused before the dial returned
		}
		held = append(held, c)
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if i%4 == 3 {
			// Some never authenticate: they are counted too, and hold
			// their place for the handshake timeout.
			continue
		}
		if _, err := c.Auth(fmt.Appendf(nil, `{"mid":1,"key":"k%d"}`, i)); err != nil {
			continue
		}
		authenticated++
	}
	if authenticated == 0 || authenticated > wantCap {
		t.Fatalf("%d connections authenticated, want between 1 and %d", authenticated, wantCap)
	}

	hc := &http.Client{Timeout: 10 * time.Second}
	resp, err := hc.Get(pushURL)
	if err != nil {
		t.Fatalf("push API while the attacker holds its connections: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	var delivered, refused int
	if _, err := fmt.Sscanf(string(body), "delivered %d refused %d", &delivered, &refused); err != nil {
		t.Fatalf("push API answered %q: %v", body, err)
	}
	if delivered != authenticated || refused == 0 {
		t.Fatalf("push delivered to %d of %d clients, %d refused; want all delivered and some refused", delivered, authenticated, refused)
	}
}

func runCapAtDescriptorLimit(t *testing.T, spec string) {
	var limit uint64
	if _, err := fmt.Sscan(spec, &limit); err != nil {
		t.Fatal(err)
	}
	// Lowered first: the cap is derived from it when the node starts.
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: limit, Max: limit}); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, func(c *config.Cloud) { c.HandshakeTimeout = time.Minute; c.MaxHandshakesPerIP = 1000 })
	push := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		reply, err := n.rpc.Broadcast(r.Context(), broadcastReq(1000, "pushed"))
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprintf(w, "delivered %d refused %d", reply.Delivered, n.st.RefusedConns())
	}))
	defer push.Close()
	fmt.Println("addr", n.tcpAddr)
	fmt.Println("push", push.URL)
	fmt.Println("max_conns", n.st.limits.max)
	_, _ = io.Copy(io.Discard, os.Stdin)
}

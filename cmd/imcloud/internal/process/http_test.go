package process

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/gorilla/websocket"

	"imcloud/adapters/memory"
	"imcloud/pipeline/config"
	"imcloud/stages/logic"
)

type nopPublisher struct{}

func (nopPublisher) Publish(string, ...*message.Message) error { return nil }
func (nopPublisher) Close() error                              { return nil }

// serveLogic serves the logic API with API key "key" within lim on a
// loopback port and returns its address.
func serveLogic(t *testing.T, lim httpLimits) string {
	t.Helper()
	cfg := config.Default().Logic
	cfg.Auth.JWTSecret = "s"
	cfg.APIKeys = []string{"key"}
	st, err := logic.New(cfg, logic.Options{Registry: memory.New(time.Minute, time.Minute), Publisher: nopPublisher{},
		PushTopics: []string{"push"}, Replies: memory.NewReplies(time.Minute), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return serve(t, st.Handler(), lim)
}

func serve(t *testing.T, h http.Handler, lim httpLimits) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := newHTTPServer(h, lim, slog.New(slog.DiscardHandler))
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Close() })
	return ln.Addr().String()
}

// waitClosed reads conn until the server closes it, failing if that takes
// longer than within. It returns what was read.
func waitClosed(t *testing.T, conn net.Conn, r io.Reader, within time.Duration) string {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(within))
	b, err := io.ReadAll(r)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("the server kept the connection open for %s (read so far: %q)", within, b)
	}
	return string(b)
}

// TestSlowBodyIsCutOffAtReadTimeout: on main only ReadHeaderTimeout was
// set, and a client that sent its headers then trickled its body held the
// connection for as long as it liked.
func TestSlowBodyIsCutOffAtReadTimeout(t *testing.T) {
	addr := serveLogic(t, httpLimits{readHeader: 300 * time.Millisecond, read: 300 * time.Millisecond, write: 5 * time.Second, idle: time.Minute, maxHeaderBytes: 16 << 10})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	fmt.Fprintf(conn, "POST /im/push/all?operation=1000 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key\r\nContent-Length: 1000\r\n\r\n")
	stop := make(chan struct{})
	defer close(stop)
	go func() { // one byte every 20 ms: the body would take 20 s
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := conn.Write([]byte("x")); err != nil {
					return
				}
			}
		}
	}()
	waitClosed(t, conn, conn, 5*time.Second)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("a trickled body held the connection %s with a 300ms read timeout", d)
	}
}

// TestUnauthorizedClosesWithoutReadingTheBody: a request without a valid
// API key gets 401 with Connection: close at once, and the server closes
// without waiting for the body. On main the server went on reading the
// body of an unauthenticated request before answering.
func TestUnauthorizedClosesWithoutReadingTheBody(t *testing.T) {
	addr := serveLogic(t, httpLimits{readHeader: 10 * time.Second, read: time.Minute, write: time.Minute, idle: time.Minute, maxHeaderBytes: 16 << 10})
	for _, path := range []string{"/im/push/all?operation=1000", "/goim/push/room", "/im/no/such/route"} {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		// Headers announce a body that never comes.
		fmt.Fprintf(conn, "POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Length: 1000\r\n\r\n", path)
		_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("%s: no reply while the body is unsent: %v", path, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnauthorized || !resp.Close {
			t.Fatalf("%s: status %d, Connection %q; want 401 with Connection: close", path, resp.StatusCode, resp.Header.Get("Connection"))
		}
		if rest := waitClosed(t, conn, br, 5*time.Second); rest != "" {
			t.Fatalf("%s: more after the 401: %q", path, rest)
		}
		conn.Close()
	}
}

// TestIdleKeepAliveIsClosed: on main an idle keep-alive connection stayed
// open forever.
func TestIdleKeepAliveIsClosed(t *testing.T) {
	addr := serveLogic(t, httpLimits{readHeader: time.Second, read: time.Second, write: time.Second, idle: 300 * time.Millisecond, maxHeaderBytes: 16 << 10})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET /im/online/total HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key\r\n\r\n")
	br := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Close {
		t.Fatalf("status %d close %v, want a kept-alive 200", resp.StatusCode, resp.Close)
	}
	start := time.Now()
	waitClosed(t, conn, br, 5*time.Second)
	if d := time.Since(start); d > 3*time.Second {
		t.Fatalf("idle connection closed after %s, idle timeout 300ms", d)
	}
}

// TestHeaderCap: a request line and headers past MaxHeaderBytes get 431.
func TestHeaderCap(t *testing.T) {
	addr := serveLogic(t, httpLimits{readHeader: time.Second, read: time.Second, write: time.Second, idle: time.Second, maxHeaderBytes: 4 << 10})
	resp, err := http.Get("http://" + addr + "/im/online/top?type=" + strings.Repeat("x", 16<<10))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Fatalf("status %d, want 431", resp.StatusCode)
	}
}

// TestWebSocketOutlivesServerTimeouts: the cloud WebSocket server has read
// and write timeouts too; a hijacked WebSocket connection must not inherit
// them (gorilla/websocket clears the deadlines on upgrade). The server
// writes only after both timeouts have passed, then reads the echo.
func TestWebSocketOutlivesServerTimeouts(t *testing.T) {
	const limit = 200 * time.Millisecond
	got := make(chan error, 1)
	up := websocket.Upgrader{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			got <- err
			return
		}
		go func() {
			defer c.Close()
			<-time.After(3 * limit) // past both server timeouts
			if err := c.WriteMessage(websocket.BinaryMessage, []byte("ping")); err != nil {
				got <- fmt.Errorf("server write after the timeouts: %w", err)
				return
			}
			_, b, err := c.ReadMessage()
			if err == nil && string(b) != "pong" {
				err = fmt.Errorf("read %q", b)
			}
			got <- err
		}()
	})
	addr := serve(t, h, httpLimits{readHeader: limit, read: limit, write: limit, idle: limit, maxHeaderBytes: 16 << 10})
	c, _, err := websocket.DefaultDialer.Dial("ws://"+addr+"/sub", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, b, err := c.ReadMessage(); err != nil || string(b) != "ping" {
		t.Fatalf("client read: %q %v", b, err)
	}
	if err := c.WriteMessage(websocket.BinaryMessage, []byte("pong")); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server never read the echo")
	}
}

// TestWebSocketServerTakesOneRequest: a connection to the cloud WebSocket
// server that is not upgraded is closed after its first request, so that
// a client cannot hold a pre-auth connection (and its place under
// cloud.max_handshakes_per_ip) by sending a request every few seconds.
func TestWebSocketServerTakesOneRequest(t *testing.T) {
	n := &Process{cfg: config.Default()}
	lim := n.httpLimitsFor("cloud ws")
	if lim.read != n.cfg.Cloud.HandshakeTimeout || lim.readHeader != n.cfg.Cloud.HandshakeTimeout {
		t.Fatalf("cloud ws limits %+v: the upgrade request must be read within cloud.handshake_timeout", lim)
	}
	addr := serve(t, http.NotFoundHandler(), lim)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Two requests back to back on one connection: only the first is answered.
	if _, err := io.WriteString(conn, "GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	got := waitClosed(t, conn, conn, 5*time.Second)
	if n := strings.Count(got, "HTTP/1.1 404"); n != 1 || !strings.Contains(got, "Connection: close") {
		t.Fatalf("server answered %d requests (%q), want 1 with Connection: close", n, got)
	}
}

// TestLogicHTTPLimitsComeFromConfig: the push API's limits are the
// logic.* keys; the others are fixed and bounded too.
func TestLogicHTTPLimitsComeFromConfig(t *testing.T) {
	cfg := config.Default()
	cfg.Logic.ReadTimeout, cfg.Logic.WriteTimeout, cfg.Logic.IdleTimeout, cfg.Logic.MaxHeaderBytes = 3*time.Second, 4*time.Second, 5*time.Second, 6000
	n := &Process{cfg: cfg}
	got := n.httpLimitsFor("logic http")
	want := httpLimits{readHeader: 3 * time.Second, read: 3 * time.Second, write: 4 * time.Second, idle: 5 * time.Second, maxHeaderBytes: 6000}
	if got != want {
		t.Fatalf("logic http limits %+v, want %+v", got, want)
	}
	for _, name := range []string{"admin", "cloud ws", "cloud wss"} {
		l := n.httpLimitsFor(name)
		if l.readHeader <= 0 || l.read <= 0 || l.write <= 0 || l.idle <= 0 || l.maxHeaderBytes <= 0 {
			t.Fatalf("%s limits %+v: every limit must be set", name, l)
		}
	}
}

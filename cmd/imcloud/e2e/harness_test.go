// Package e2e starts imcloud's stages in process on 127.0.0.1:0 and drives
// them with real WebSocket and TCP clients and real HTTP requests.
package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"imcloud/stages/logic"
	"imcloud/stages/logic/openapitest"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/cmd/imcloud/internal/process"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

const (
	testSecret = "e2e-secret"
	testAPIKey = "e2e-api-key-0123456789"
	// testClusterSecret authenticates the internal gRPC calls of every
	// node the tests start, in process or as a process.
	testClusterSecret = "e2e-cluster-secret-0123456789"
	// wait bounds every wait on a condition.
	wait = 10 * time.Second
)

type harness struct {
	t     *testing.T
	cfg   config.Config
	node  *process.Process
	addrs process.Addrs
}

// start runs every stage in process on loopback ports, with sets applied
// over the test defaults.
func start(t *testing.T, sets ...string) *harness {
	t.Helper()
	base := []string{
		"broker.kind=gochannel", "registry.kind=memory",
		"logic.http_addr=127.0.0.1:0", "logic.grpc_addr=127.0.0.1:0",
		"cloud.tcp_addr=127.0.0.1:0", "cloud.ws_addr=127.0.0.1:0", "cloud.grpc_addr=127.0.0.1:0",
		"logic.auth.jwt_secret=" + testSecret, "logic.api_keys=" + testAPIKey,
		"cluster.secret=" + testClusterSecret,
		"job.retry.initial_interval=10ms", "job.retry.max_retries=2",
	}
	cfg, err := config.Load(config.Sources{Sets: append(base, sets...)})
	if err != nil {
		t.Fatalf("config: %v", err)
	}
	level := slog.LevelWarn
	if os.Getenv("E2E_DEBUG") != "" {
		level = slog.LevelDebug
	}
	logger := slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: level}))
	n, err := process.Start(context.Background(), cfg, logger)
	if err != nil {
		t.Fatalf("start node: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		defer cancel()
		_ = n.Shutdown(ctx)
	})
	return &harness{t: t, cfg: cfg, node: n, addrs: n.Addrs()}
}

// testWriter logs to the test until it ends; a library goroutine that
// logs after its Close returned is then dropped rather than panicking.
type testWriter struct {
	t    *testing.T
	done *atomic.Bool
}

func newTestWriter(t *testing.T) testWriter {
	w := testWriter{t: t, done: &atomic.Bool{}}
	t.Cleanup(func() { w.done.Store(true) })
	return w
}

func (w testWriter) Write(p []byte) (int, error) {
	if !w.done.Load() {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (h *harness) token(c token.Claims, ttl time.Duration) string {
	h.t.Helper()
	tok, err := token.Sign(testSecret, c, ttl)
	if err != nil {
		h.t.Fatal(err)
	}
	return tok
}

// dial connects a client over transport ("ws" or "tcp") without auth.
func (h *harness) dial(transport string) *client.Conn {
	h.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	target := h.addrs.CloudTCP
	if transport == "ws" {
		target = "ws://" + h.addrs.CloudWS + "/sub"
	}
	c, err := client.Dial(ctx, target, client.Options{})
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { _ = c.Close() })
	_ = c.SetReadDeadline(time.Now().Add(wait))
	return c
}

// connect dials and authenticates with a JWT for claims.
func (h *harness) connect(transport string, claims token.Claims) *client.Conn {
	h.t.Helper()
	c := h.dial(transport)
	reply, err := c.Auth([]byte(h.token(claims, time.Hour)))
	if err != nil {
		h.t.Fatalf("auth %s mid %d: %v", transport, claims.Mid, err)
	}
	if reply.Mid != claims.Mid || (claims.Key != "" && reply.Key != claims.Key) {
		h.t.Fatalf("auth reply %+v does not match claims %+v", reply, claims)
	}
	return c
}

// apiReply is the HTTP reply envelope.
type apiReply struct {
	Code    int             `json:"code"`
	Message string          `json:"message"`
	Data    json.RawMessage `json:"data"`
}

type request struct {
	path        string // e.g. /im/push/keys
	query       url.Values
	body        string
	contentType string
	header      http.Header
	noAPIKey    bool
}

func (h *harness) do(r request) (int, apiReply) {
	h.t.Helper()
	u := "http://" + h.addrs.HTTP + r.path
	if len(r.query) > 0 {
		u += "?" + r.query.Encode()
	}
	req, err := http.NewRequest(http.MethodPost, u, strings.NewReader(r.body))
	if err != nil {
		h.t.Fatal(err)
	}
	for k, vs := range r.header {
		req.Header[k] = vs
	}
	if r.contentType != "" {
		req.Header.Set("Content-Type", r.contentType)
	}
	if !r.noAPIKey {
		req.Header.Set("Authorization", "Bearer "+testAPIKey)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if c, err := openAPI(); err != nil {
		h.t.Errorf("logic's OpenAPI document: %v", err)
	} else {
		c.Check(h.t, http.MethodPost, u, r.contentType, r.body, req.Header, resp.StatusCode, resp.Header, b)
	}
	var rep apiReply
	if err := json.Unmarshal(b, &rep); err != nil {
		h.t.Fatalf("reply to %s is not the JSON envelope: %q", r.path, b)
	}
	return resp.StatusCode, rep
}

// openAPI checks every exchange h.do makes against logic's document.
var openAPI = sync.OnceValues(func() (*openapitest.Checker, error) { return openapitest.New(logic.OpenAPI()) })

// push posts and fails the test unless it got 200.
func (h *harness) push(r request) apiReply {
	h.t.Helper()
	code, rep := h.do(r)
	if code != http.StatusOK || rep.Code != 0 {
		h.t.Fatalf("push %s: status %d, reply %+v", r.path, code, rep)
	}
	return rep
}

// expect reads c's next packet and checks its op and body.
func expect(t *testing.T, name string, c *client.Conn, op int32, body string) wire.Packet {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(wait))
	p, err := c.Read()
	if err != nil {
		t.Fatalf("%s: read: %v", name, err)
	}
	if p.Op != op || string(p.Body) != body {
		t.Fatalf("%s: got op %d %q, want op %d %q", name, p.Op, p.Body, op, body)
	}
	return p
}

// expectClosed reads until the connection ends, failing on any packet, and
// returns the read error.
func expectClosed(t *testing.T, name string, c *client.Conn) error {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(wait))
	p, err := c.Read()
	if err == nil {
		t.Fatalf("%s: got op %d %q, want the connection closed", name, p.Op, p.Body)
	}
	var ne interface{ Timeout() bool }
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("%s: connection still open after %s", name, wait)
	}
	return err
}

func uniq(prefix string) string { return fmt.Sprintf("%s-%d", prefix, time.Now().UnixNano()) }

package logic

import (
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/memory"
	"imcloud/pipeline/config"
)

// recordingPublisher records publishes, or fails them all.
type recordingPublisher struct {
	mu   sync.Mutex
	msgs []*message.Message
	fail error
}

func (p *recordingPublisher) Publish(_ string, msgs ...*message.Message) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.fail != nil {
		return p.fail
	}
	p.msgs = append(p.msgs, msgs...)
	return nil
}

func (p *recordingPublisher) Close() error { return nil }

func (p *recordingPublisher) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.msgs)
}

func newTestServer(t *testing.T, pub message.Publisher) *httptest.Server {
	t.Helper()
	cfg := config.Default().Logic
	cfg.Auth.JWTSecret = "s"
	st, err := New(cfg, Options{
		Registry: memory.New(time.Minute, time.Minute), Publisher: pub, PushTopics: []string{"push"},
		Replies: memory.NewReplies(time.Minute), Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(st.Handler())
	t.Cleanup(srv.Close)
	return srv
}

func post(t *testing.T, url string, header http.Header) (*http.Response, map[string]any) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url, strings.NewReader("hello"))
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var body map[string]any
	if err := json.Unmarshal(b, &body); err != nil {
		t.Fatalf("reply %q: %v", b, err)
	}
	return resp, body
}

func TestBrokerDownIs503WithRetryAfter(t *testing.T) {
	srv := newTestServer(t, &recordingPublisher{fail: errors.New("connection refused")})
	for _, route := range []string{"/im/push/room?operation=1000&type=live&room=1", "/im/push/all?operation=1000"} {
		resp, body := post(t, srv.URL+route, nil)
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || body["code"] != float64(-503) {
			t.Fatalf("%s: status %d, Retry-After %q, body %v; want 503 with Retry-After", route, resp.StatusCode, resp.Header.Get("Retry-After"), body)
		}
	}
}

func TestIdempotencyKeyPublishesOnce(t *testing.T) {
	pub := &recordingPublisher{}
	srv := newTestServer(t, pub)
	url := srv.URL + "/im/push/room?operation=1000&type=live&room=1"
	key := http.Header{"Idempotency-Key": {"order-42"}}

	first, a := post(t, url, key)
	second, b := post(t, url, key)
	if first.StatusCode != 200 || second.StatusCode != 200 {
		t.Fatalf("statuses %d, %d", first.StatusCode, second.StatusCode)
	}
	if pub.count() != 1 {
		t.Fatalf("a retried request published %d messages in all, want 1", pub.count())
	}
	if a["data"].(map[string]any)["msg_id"] != b["data"].(map[string]any)["msg_id"] || second.Header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("retry answered %v (replayed=%q), want the first reply %v", b, second.Header.Get("Idempotent-Replayed"), a)
	}

	post(t, url, http.Header{"Idempotency-Key": {"order-43"}})
	post(t, url, nil)
	post(t, url, nil)
	if pub.count() != 4 {
		t.Fatalf("published %d messages, want 4 (a new key and two requests without one)", pub.count())
	}
}

func TestFailedIdempotentRequestIsNotRemembered(t *testing.T) {
	pub := &recordingPublisher{fail: errors.New("down")}
	srv := newTestServer(t, pub)
	url := srv.URL + "/im/push/all?operation=1000"
	key := http.Header{"Idempotency-Key": {"k"}}
	if resp, _ := post(t, url, key); resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("status %d, want 503", resp.StatusCode)
	}
	pub.mu.Lock()
	pub.fail = nil
	pub.mu.Unlock()
	if resp, _ := post(t, url, key); resp.StatusCode != 200 || pub.count() != 1 {
		t.Fatalf("retry after the broker returned: status %d, %d published; want 200 and 1", resp.StatusCode, pub.count())
	}
}

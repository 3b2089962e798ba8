package logic

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/pipeline/idempotency"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// apiServer is a logic HTTP API over a memory registry holding one cloud
// node "n1" with the connections the test adds.
type apiServer struct {
	t        *testing.T
	url      string
	registry *memory.Registry
	pub      *recordingPublisher
	st       *Stage
}

type apiOptions struct {
	registry pipeline.Registry
	replies  ReplyStore
	pub      message.Publisher
	apiKeys  []string
	// writeTimeout, when set, replaces logic.write_timeout.
	writeTimeout time.Duration
	// history gives positions; nil keeps none.
	history pipeline.History
	// historyLimits, when its MaxSize is set, replaces [history].
	historyLimits config.History
	// corsOrigins is logic.cors_origins.
	corsOrigins []string
	// topics are the push shards; nil: one, "push".
	topics []string
}

func newAPI(t *testing.T, o apiOptions) *apiServer {
	t.Helper()
	cfg := config.Default().Logic
	cfg.Auth.JWTSecret = "s"
	cfg.APIKeys = o.apiKeys
	cfg.CORSOrigins = o.corsOrigins
	if o.writeTimeout > 0 {
		cfg.WriteTimeout = o.writeTimeout
	}
	mem := memory.New(time.Minute, time.Minute)
	if _, err := mem.RenewNode(context.Background(), &pb.NodeInfo{Id: "n1", Host: "10.0.0.1", TcpPort: 3101, WsPort: 3102, Weight: 1}); err != nil {
		t.Fatal(err)
	}
	reg := o.registry
	if reg == nil {
		reg = mem
	}
	replies := o.replies
	if replies == nil {
		replies = memory.NewReplies(time.Minute)
	}
	rec := &recordingPublisher{}
	pub := o.pub
	if pub == nil {
		pub = rec
	}
	topics := o.topics
	if topics == nil {
		topics = []string{"push"}
	}
	st, err := New(cfg, Options{Registry: reg, Publisher: pub, PushTopics: topics, Replies: replies, History: o.history,
		HistoryLimits: o.historyLimits, Heartbeat: 30 * time.Second, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(st.Handler())
	t.Cleanup(srv.Close)
	return &apiServer{t: t, url: srv.URL, registry: mem, pub: rec, st: st}
}

// online adds a session for key of mid on n1.
func (a *apiServer) online(mid int64, key string) {
	a.t.Helper()
	if _, _, err := a.registry.AddSession(context.Background(), mid, key, "n1", 0); err != nil {
		a.t.Fatal(err)
	}
}

type apiReply struct {
	status int
	header http.Header
	Code   int             `json:"code"`
	Msg    *string         `json:"message"`
	Data   json.RawMessage `json:"data"`
}

// do sends method path?query with body and headers.
func (a *apiServer) do(method, pathQuery, contentType, body string, header http.Header) apiReply {
	a.t.Helper()
	req, err := http.NewRequest(method, a.url+pathQuery, strings.NewReader(body))
	if err != nil {
		a.t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var r apiReply
	if err := json.Unmarshal(b, &r); err != nil {
		a.t.Fatalf("%s %s: reply %q is not the envelope: %v", method, pathQuery, b, err)
	}
	r.status, r.header = resp.StatusCode, resp.Header
	checkOpenAPI(a.t, method, a.url+pathQuery, contentType, body, header, resp.StatusCode, resp.Header, b)
	return r
}

// published decodes what the recording publisher got.
func (a *apiServer) published() []*pb.PushMsg {
	a.t.Helper()
	a.pub.mu.Lock()
	defer a.pub.mu.Unlock()
	out := make([]*pb.PushMsg, 0, len(a.pub.msgs))
	for _, m := range a.pub.msgs {
		pm, err := pipeline.DecodePush(m)
		if err != nil {
			a.t.Fatal(err)
		}
		out = append(out, pm)
	}
	return out
}

// TestBadStringsAre400NamingTheField: every string a caller names is
// checked (UTF-8, length, control characters) before it reaches the
// registry, a log line or protobuf. On main, room=%FF reached the
// protobuf marshal and answered 503 + Retry-After, so callers retried a
// permanent error forever.
func TestBadStringsAre400NamingTheField(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(1, "k1")
	long := strings.Repeat("r", 256)
	tests := []struct {
		name, method, path string
		header             http.Header
		field              string
	}{
		{"room not UTF-8", "POST", "/im/push/room?operation=1000&type=live&room=%FF", nil, "room"},
		{"goim room not UTF-8", "POST", "/goim/push/room?operation=1000&type=live&room=%FF", nil, "room"},
		{"room with a control character", "POST", "/im/push/room?operation=1000&type=live&room=a%00b", nil, "room"},
		{"room too long", "POST", "/im/push/room?operation=1000&type=live&room=" + long, nil, "room"},
		{"type not UTF-8", "POST", "/im/push/room?operation=1000&type=%C3%28&room=1", nil, "type"},
		{"type with ://", "POST", "/im/push/room?operation=1000&type=a://b&room=1", nil, "type"},
		{"type too long", "POST", "/im/push/room?operation=1000&type=" + long[:wire.MaxRoomLen-3] + "&room=1", nil, "type"},
		{"type://room too long", "POST", "/im/push/room?operation=1000&type=live&room=" + long[:wire.MaxRoomLen-len("live://")+1], nil, "room"},
		{"room with a space", "POST", "/im/push/room?operation=1000&type=live&room=a+b", nil, "room"},
		{"room with a comma", "POST", "/goim/push/room?operation=1000&type=live&room=a,b", nil, "room"},
		{"room with a '*'", "POST", "/im/push/room?operation=1000&type=live&room=a*", nil, "room"},
		{"type with a '*'", "POST", "/im/push/room?operation=1000&type=*&room=1", nil, "type"},
		{"type with a space", "POST", "/im/push/room?operation=1000&type=a+b&room=1", nil, "type"},
		{"key with a space", "POST", "/im/push/keys?operation=1000&keys=a+b", nil, "keys"},
		{"key with a comma", "POST", "/goim/push/keys?operation=1000&keys=k1,k2", nil, "keys"},
		{"key empty", "POST", "/im/push/keys?operation=1000&keys=k1&keys=", nil, "keys"},
		{"key one byte too long", "POST", "/im/push/keys?operation=1000&keys=" + long[:wire.MaxKeyLen+1], nil, "keys"},
		{"online/room room with a space", "GET", "/im/online/room?type=live&rooms=a+b", nil, "rooms"},
		{"online/top type with a comma", "GET", "/im/online/top?type=a,b", nil, "type"},
		{"nodes/weighted platform one byte too long", "GET", "/im/nodes/weighted?platform=" + long[:wire.MaxPlatformLen+1], nil, "platform"},
		{"key not UTF-8", "POST", "/im/push/keys?operation=1000&keys=k1&keys=%FF", nil, "keys"},
		{"key with a newline", "POST", "/goim/push/keys?operation=1000&keys=k1%0Aforged", nil, "keys"},
		{"key too long", "POST", "/im/push/keys?operation=1000&keys=" + long, nil, "keys"},
		{"mid not a number", "POST", "/im/push/mids?operation=1000&mids=%FF", nil, "mids"},
		{"speed not a number", "POST", "/im/push/all?operation=1000&speed=%FF", nil, "speed"},
		{"operation not a number", "POST", "/im/push/all?operation=%FF", nil, "operation"},
		{"request id not UTF-8", "POST", "/im/push/all?operation=1000", http.Header{"X-Request-Id": {"\xff"}}, "X-Request-ID"},
		{"request id with a tab", "POST", "/im/push/all?operation=1000", http.Header{"X-Request-Id": {"a\tb"}}, "X-Request-ID"},
		{"request id too long", "POST", "/im/push/all?operation=1000", http.Header{"X-Request-Id": {long}}, "X-Request-ID"},
		{"request id twice", "POST", "/im/push/all?operation=1000", http.Header{"X-Request-Id": {"a", "b"}}, "X-Request-ID"},
		{"idempotency key not UTF-8", "POST", "/im/push/all?operation=1000", http.Header{"Idempotency-Key": {"\xff"}}, "Idempotency-Key"},
		{"idempotency key too long", "POST", "/im/push/all?operation=1000", http.Header{"Idempotency-Key": {long}}, "Idempotency-Key"},
		{"online/top type not UTF-8", "GET", "/im/online/top?type=%FF", nil, "type"},
		{"online/top limit not a number", "GET", "/goim/online/top?type=live&limit=x", nil, "limit"},
		{"online/room room not UTF-8", "GET", "/goim/online/room?type=live&rooms=1&rooms=%FF", nil, "rooms"},
		{"online/room type with a control character", "GET", "/im/online/room?type=%7F&rooms=1", nil, "type"},
		{"nodes/weighted platform not UTF-8", "GET", "/im/nodes/weighted?platform=%FF", nil, "platform"},
		{"goim nodes/weighted platform too long", "GET", "/goim/nodes/weighted?platform=" + long, nil, "platform"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := a.do(tt.method, tt.path, "", "hello", tt.header)
			if r.status != http.StatusBadRequest || r.Code != -400 || r.Msg == nil || !strings.HasPrefix(*r.Msg, tt.field+":") {
				t.Fatalf("status %d code %d message %v; want 400 naming %q", r.status, r.Code, deref(r.Msg), tt.field)
			}
			if ra := r.header.Get("Retry-After"); ra != "" {
				t.Fatalf("a permanent error carries Retry-After %q", ra)
			}
		})
	}
	if n := a.pub.count(); n != 0 {
		t.Fatalf("%d messages published for invalid requests", n)
	}
	// Valid UTF-8 at the limits passes: what a client may join, hold or
	// report (proto/wire), the API accepts.
	room := strings.Repeat("é", (wire.MaxRoomLen-len("live://"))/2)
	if err := wire.ValidRoom("live://" + room); err != nil {
		t.Fatal(err)
	}
	if r := a.do("POST", "/im/push/room?operation=1000&type=live&room="+url.QueryEscape(room), "", "x", nil); r.status != 200 {
		t.Fatalf("a %d-byte UTF-8 room: status %d %v", len(room), r.status, deref(r.Msg))
	}
	if r := a.do("POST", "/im/push/room?operation=1000&type="+long[:wire.MaxRoomLen-4]+"&room=1", "", "x", nil); r.status != 200 {
		t.Fatalf("a %d-byte type: status %d %v", wire.MaxRoomLen-4, r.status, deref(r.Msg))
	}
	if r := a.do("POST", "/im/push/keys?operation=1000&keys="+long[:wire.MaxKeyLen], "", "x", nil); r.status != 200 {
		t.Fatalf("a %d-byte key: status %d %v", wire.MaxKeyLen, r.status, deref(r.Msg))
	}
	if r := a.do("GET", "/im/nodes/weighted?platform="+long[:wire.MaxPlatformLen], "", "", nil); r.status != 200 {
		t.Fatalf("a %d-byte platform: status %d %v", wire.MaxPlatformLen, r.status, deref(r.Msg))
	}
	if r := a.do("POST", "/im/push/all?operation=1000", "", "x", http.Header{"Idempotency-Key": {long[:MaxIdempotencyKeyBytes]}}); r.status != 200 {
		t.Fatalf("a %d-byte Idempotency-Key: status %d %v", MaxIdempotencyKeyBytes, r.status, deref(r.Msg))
	}
}

func deref(s *string) string {
	if s == nil {
		return "<none>"
	}
	return *s
}

// failingRegistry is a registry that is down, or that holds a corrupt
// entry (a bug: a server id that is not UTF-8).
type failingRegistry struct {
	pipeline.Registry
	down    bool
	corrupt bool
}

func (f failingRegistry) ServersByKeys(ctx context.Context, keys []string) (map[string]string, error) {
	if f.down {
		return nil, errors.New("dial tcp 127.0.0.1:6379: connection refused")
	}
	if f.corrupt {
		return map[string]string{keys[0]: "\xff"}, nil
	}
	return f.Registry.ServersByKeys(ctx, keys)
}

func (f failingRegistry) SessionsByKeys(ctx context.Context, keys []string) (map[string]pipeline.Session, error) {
	if f.down {
		return nil, errors.New("dial tcp 127.0.0.1:6379: connection refused")
	}
	if f.corrupt {
		return map[string]pipeline.Session{keys[0]: {Mid: 1, Server: "\xff"}}, nil
	}
	return f.Registry.SessionsByKeys(ctx, keys)
}

func (f failingRegistry) Nodes(ctx context.Context) ([]*pb.NodeInfo, error) {
	if f.down {
		return nil, errors.New("dial tcp 127.0.0.1:6379: connection refused")
	}
	if f.corrupt {
		return []*pb.NodeInfo{{Id: "\xff"}}, nil
	}
	return f.Registry.Nodes(ctx)
}

// downReplies is an idempotency store that is down.
type downReplies struct{}

var errStoreDown = errors.New("dial tcp 127.0.0.1:6379: connection refused")

func (downReplies) Reserve(context.Context, string, string) (idempotency.Entry, error) {
	return idempotency.Entry{}, errStoreDown
}
func (downReplies) Complete(context.Context, string, string, []byte) error { return errStoreDown }
func (downReplies) Release(context.Context, string, string) error          { return errStoreDown }

// TestOnly503ForADependencyThatIsDown: 503 + Retry-After means "retry
// later, nothing was accepted" and is given only when the broker, the
// registry or the idempotency store is down; a bug behind valid input is a
// 500 without Retry-After. On main every non-broker failure was 503.
func TestOnly503ForADependencyThatIsDown(t *testing.T) {
	mem := memory.New(time.Minute, time.Minute)
	_, _ = mem.RenewNode(context.Background(), &pb.NodeInfo{Id: "n1"})
	_, _, _ = mem.AddSession(context.Background(), 1, "k1", "n1", 0)
	tests := []struct {
		name   string
		o      apiOptions
		path   string
		header http.Header
		status int
	}{
		{"broker down", apiOptions{pub: &recordingPublisher{fail: errors.New("connection refused")}}, "/im/push/all?operation=1000", nil, 503},
		{"queue full", apiOptions{pub: &recordingPublisher{fail: fmt.Errorf("publish: %w", pipeline.ErrQueueFull)}}, "/im/push/all?operation=1000", nil, 503},
		{"registry down (keys)", apiOptions{registry: failingRegistry{Registry: mem, down: true}}, "/im/push/keys?operation=1000&keys=k1", nil, 503},
		{"registry down (room)", apiOptions{registry: failingRegistry{Registry: mem, down: true}}, "/goim/push/room?operation=1000&type=live&room=1", nil, 503},
		{"registry down (stats)", apiOptions{registry: failingRegistry{Registry: mem, down: true}}, "/im/online/total", nil, 503},
		{"idempotency store down", apiOptions{replies: downReplies{}}, "/im/push/all?operation=1000", http.Header{"Idempotency-Key": {"k"}}, 503},
		{"a bug behind valid input", apiOptions{registry: failingRegistry{Registry: mem, corrupt: true}}, "/im/push/keys?operation=1000&keys=k1", nil, 500},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := newAPI(t, tt.o)
			method := "POST"
			if strings.Contains(tt.path, "/online/") {
				method = "GET"
			}
			r := a.do(method, tt.path, "", "x", tt.header)
			retry := r.header.Get("Retry-After") != ""
			if tt.name == "queue full" && !strings.Contains(deref(r.Msg), "queue full") {
				t.Fatalf("a full queue answered %q, want it named", deref(r.Msg))
			}
			if r.status != tt.status || r.Code != -tt.status || retry != (tt.status == 503) {
				t.Fatalf("status %d code %d Retry-After %q (%v); want %d, Retry-After only with 503",
					r.status, r.Code, r.header.Get("Retry-After"), deref(r.Msg), tt.status)
			}
		})
	}
}

// blockingPublisher holds every publish until release is closed, telling
// entered when one starts.
type blockingPublisher struct {
	recordingPublisher
	entered chan struct{}
	release chan struct{}
}

func (p *blockingPublisher) Publish(topic string, msgs ...*message.Message) error {
	p.entered <- struct{}{}
	<-p.release
	return p.recordingPublisher.Publish(topic, msgs...)
}

// TestIdempotencyKeyInFlightIs409: two requests racing with one key
// publish once; the second is told 409 while the first runs. On main both
// published.
func TestIdempotencyKeyInFlightIs409(t *testing.T) {
	pub := &blockingPublisher{entered: make(chan struct{}, 4), release: make(chan struct{})}
	a := newAPI(t, apiOptions{pub: pub})
	key := http.Header{"Idempotency-Key": {"order-7"}}
	const path = "/im/push/room?operation=1000&type=live&room=1"

	first := make(chan apiReply, 1)
	go func() { first <- a.do("POST", path, "", "hello", key) }()
	select {
	case <-pub.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the first request never reached the publisher")
	}
	second := a.do("POST", path, "", "hello", key)
	if second.status != http.StatusConflict || second.Code != -409 || second.header.Get("Retry-After") == "" {
		t.Fatalf("a request while the first is in flight: status %d code %d Retry-After %q; want 409 with Retry-After",
			second.status, second.Code, second.header.Get("Retry-After"))
	}
	other := a.do("POST", path, "", "another message", key)
	if other.status != http.StatusUnprocessableEntity {
		t.Fatalf("another message under an in-flight key: status %d, want 422", other.status)
	}
	close(pub.release)
	if r := <-first; r.status != 200 {
		t.Fatalf("the first request: status %d %v", r.status, deref(r.Msg))
	}
	third := a.do("POST", path, "", "hello", key)
	if third.status != 200 || third.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("a retry after the first finished: status %d replayed %q; want the stored reply", third.status, third.header.Get("Idempotent-Replayed"))
	}
	if n := pub.count(); n != 1 {
		t.Fatalf("%d messages published for one key, want 1", n)
	}
	if len(pub.entered) != 0 {
		t.Fatal("a second request reached the publisher")
	}
}

// TestIdempotencyKeyReusedWithOtherContentIs422: a key names one request;
// reused with another message or other parameters it is refused, where
// main replayed the first reply and silently dropped the new message.
func TestIdempotencyKeyReusedWithOtherContentIs422(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(1, "k1")
	a.online(2, "k2")
	key := http.Header{"Idempotency-Key": {"order-9"}}
	if r := a.do("POST", "/im/push/keys?operation=1000&keys=k1&keys=k2", "", "hello", key); r.status != 200 {
		t.Fatalf("first request: %d %v", r.status, deref(r.Msg))
	}
	for _, tt := range []struct{ name, path, body string }{
		{"another message", "/im/push/keys?operation=1000&keys=k1&keys=k2", "hello!"},
		{"another target", "/im/push/keys?operation=1000&keys=k1", "hello"},
		{"another operation", "/im/push/keys?operation=1001&keys=k1&keys=k2", "hello"},
	} {
		r := a.do("POST", tt.path, "", tt.body, key)
		if r.status != http.StatusUnprocessableEntity || r.Code != -422 || !strings.Contains(deref(r.Msg), "Idempotency-Key") {
			t.Fatalf("%s under a used key: status %d %v; want 422 naming Idempotency-Key", tt.name, r.status, deref(r.Msg))
		}
	}
	// The same push, its keys in another order, through goim's API: the same request.
	r := a.do("POST", "/goim/push/keys?operation=1000&keys=k2&keys=k1", "application/json", "hello", key)
	if r.status != 200 || r.header.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("the same request again: status %d replayed %q, want the stored reply", r.status, r.header.Get("Idempotent-Replayed"))
	}
	if n := a.pub.count(); n != 1 {
		t.Fatalf("%d messages published, want 1", n)
	}
}

// TestFailedIdempotentRequestReleasesTheKey: a 5xx leaves nothing behind,
// so the retry the 503 invites runs.
func TestFailedIdempotentRequestReleasesTheKey(t *testing.T) {
	reg := &toggleRegistry{}
	a := newAPI(t, apiOptions{registry: reg})
	reg.Registry = a.registry
	a.online(1, "k1")
	key := http.Header{"Idempotency-Key": {"k"}}
	reg.setDown(true)
	if r := a.do("POST", "/im/push/keys?operation=1000&keys=k1", "", "x", key); r.status != 503 {
		t.Fatalf("registry down: %d, want 503", r.status)
	}
	reg.setDown(false)
	if r := a.do("POST", "/im/push/keys?operation=1000&keys=k1", "", "x", key); r.status != 200 || r.header.Get("Idempotent-Replayed") != "" {
		t.Fatalf("retry: status %d replayed %q; want a fresh 200", r.status, r.header.Get("Idempotent-Replayed"))
	}
	if n := a.pub.count(); n != 1 {
		t.Fatalf("%d published, want 1", n)
	}
}

type toggleRegistry struct {
	pipeline.Registry
	mu   sync.Mutex
	down bool
}

func (r *toggleRegistry) setDown(d bool) { r.mu.Lock(); r.down = d; r.mu.Unlock() }

func (r *toggleRegistry) ServersByKeys(ctx context.Context, keys []string) (map[string]string, error) {
	r.mu.Lock()
	down := r.down
	r.mu.Unlock()
	if down {
		return nil, errors.New("connection refused")
	}
	return r.Registry.ServersByKeys(ctx, keys)
}

func (r *toggleRegistry) SessionsByKeys(ctx context.Context, keys []string) (map[string]pipeline.Session, error) {
	r.mu.Lock()
	down := r.down
	r.mu.Unlock()
	if down {
		return nil, errors.New("connection refused")
	}
	return r.Registry.SessionsByKeys(ctx, keys)
}

// TestGoimRequestsPublishTheBodyVerbatim replays the requests goim's push
// tools (benchmarks/push_room, push_rooms, push, multi_push) send, and
// checks each message is published exactly as sent, to exactly the
// target in the query string. On main, goim's push_room got 400 "unknown
// field" and a JSON message holding room/mids was re-routed.
func TestGoimRequestsPublishTheBodyVerbatim(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(5, "k5")
	a.online(6, "k6")
	tests := []struct {
		name, path, contentType, body string
		want                          *pb.PushMsg
	}{
		{"goim push_room", "/goim/push/room?operation=1000&type=test&room=1", "application/json", `{"test":1}`,
			&pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: 1000, Room: "test://1"}},
		{"goim push_rooms", "/goim/push/room?operation=1000&type=test&room=7", "application/json", `{"test":1}`,
			&pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: 1000, Room: "test://7"}},
		{"goim push (mids, form content type)", "/goim/push/mids?operation=1000&mids=5", "application/x-www-form-urlencoded", `{"m":{"test":1},"u":5}`,
			&pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: 1000, Server: "n1", Keys: []string{"k5"}}},
		{"goim push/keys with a JSON message naming other keys", "/goim/push/keys?operation=1000&keys=k5", "application/json", `{"keys":["k6"],"msg":"x"}`,
			&pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: 1000, Server: "n1", Keys: []string{"k5"}}},
		{"goim push/all", "/goim/push/all?operation=1000&speed=0", "application/json", `{"room":"2","msg":"hello"}`,
			&pb.PushMsg{Type: pb.PushMsg_BROADCAST, Operation: 1000}},
		{"a JSON message naming another room", "/im/push/room?operation=1000&type=live&room=1", "application/json", `{"room":"2","msg":"hello"}`,
			&pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: 1000, Room: "live://1"}},
		{"a JSON message naming another mid", "/im/push/mids?operation=1000&mids=5", "application/json; charset=utf-8", `{"mids":[6],"msg":"x"}`,
			&pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: 1000, Server: "n1", Keys: []string{"k5"}}},
		{"the explicit form under /goim/ is a message too", "/goim/push/room?operation=1000&type=live&room=1", PushJSONType, `{"type":"live","room":"2","msg":"x"}`,
			&pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: 1000, Room: "live://1"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(a.published())
			r := a.do("POST", tt.path, tt.contentType, tt.body, nil)
			if r.status != 200 || r.Code != 0 {
				t.Fatalf("status %d code %d %v, want 200 code 0", r.status, r.Code, deref(r.Msg))
			}
			if strings.HasPrefix(tt.path, "/goim/") && deref(r.Msg) != "" {
				t.Fatalf("goim reply message %q, want goim's \"\"", deref(r.Msg))
			}
			got := a.published()[before:]
			if len(got) != 1 {
				t.Fatalf("%d messages published, want 1", len(got))
			}
			pm := got[0]
			if string(pm.Msg) != tt.body {
				t.Fatalf("published message %q, want the body verbatim %q", pm.Msg, tt.body)
			}
			if pm.Type != tt.want.Type || pm.Operation != tt.want.Operation || pm.Room != tt.want.Room || pm.Server != tt.want.Server || !slices.Equal(pm.Keys, tt.want.Keys) {
				t.Fatalf("published %v, want %v", pm, tt.want)
			}
		})
	}
}

// TestExplicitJSONForm: /im/ reads a parameter object only under its own
// media type.
func TestExplicitJSONForm(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(5, "k5")
	r := a.do("POST", "/im/push/keys", PushJSONType, `{"operation":1000,"keys":["k5"],"msg":{"a":1}}`, nil)
	if r.status != 200 {
		t.Fatalf("status %d %v", r.status, deref(r.Msg))
	}
	pm := a.published()[0]
	if string(pm.Msg) != `{"a":1}` || !slices.Equal(pm.Keys, []string{"k5"}) {
		t.Fatalf("published %v", pm)
	}
	// goim's guests (mid 0) are reachable through goim's API only.
	if r := a.do("POST", "/goim/push/mids?operation=1000&mids=0", "", "x", nil); r.status != 200 {
		t.Fatalf("goim push to mid 0: %d %v", r.status, deref(r.Msg))
	}
	if r := a.do("POST", "/im/push/mids?operation=1000&mids=0", "", "x", nil); r.status != 400 {
		t.Fatalf("imcloud push to mid 0: %d, want 400", r.status)
	}
}

// TestParameterGivenTwiceIs400: a single-valued parameter given twice, or
// in both the query string and the JSON object, is refused rather than
// one of them silently winning; keys, mids and rooms are lists and may
// repeat in the query string.
func TestParameterGivenTwiceIs400(t *testing.T) {
	a := newAPI(t, apiOptions{})
	a.online(5, "k5")
	a.online(6, "k6")
	tests := []struct {
		method, path, contentType, body string
		field                           string // "" = accepted
	}{
		{"POST", "/im/push/room?operation=1000&type=live&room=1&room=2", "", "x", "room"},
		{"POST", "/goim/push/room?operation=1000&operation=1001&type=live&room=1", "", "x", "operation"},
		{"POST", "/goim/push/room?operation=1000&type=live&type=test&room=1", "", "x", "type"},
		{"POST", "/im/push/all?operation=1000&speed=1&speed=2", "", "x", "speed"},
		{"POST", "/im/push/room?operation=1000&type=live", PushJSONType, `{"type":"test","room":"1","msg":"x"}`, "type"},
		{"POST", "/im/push/keys?operation=1000&keys=k5", PushJSONType, `{"keys":["k6"],"msg":"x"}`, "keys"},
		{"POST", "/im/push/room?operation=1000", PushJSONType, `{"type":"live","room":["1","2"],"msg":"x"}`, "room"},
		{"GET", "/im/online/top?type=live&type=test", "", "", "type"},
		{"GET", "/goim/online/top?type=live&limit=1&limit=2", "", "", "limit"},
		{"GET", "/goim/nodes/weighted?platform=web&platform=ios", "", "", "platform"},
		{"POST", "/im/push/keys?operation=1000&keys=k5&keys=k6", "", "x", ""},
		{"POST", "/goim/push/mids?operation=1000&mids=5&mids=6", "", "x", ""},
		{"POST", "/im/push/mids?operation=1000", PushJSONType, `{"mids":[5,6],"msg":"x"}`, ""},
		{"GET", "/goim/online/room?type=live&rooms=1&rooms=2", "", "", ""},
	}
	for _, tt := range tests {
		r := a.do(tt.method, tt.path, tt.contentType, tt.body, nil)
		if tt.field == "" {
			if r.status != 200 {
				t.Errorf("%s %s: %d %v, want 200", tt.method, tt.path, r.status, deref(r.Msg))
			}
			continue
		}
		if r.status != 400 || !strings.HasPrefix(deref(r.Msg), tt.field+":") {
			t.Errorf("%s %s %s: %d %v, want 400 naming %q", tt.method, tt.path, tt.body, r.status, deref(r.Msg), tt.field)
		}
	}
}

// TestGoimNodesShapes: /goim/nodes/weighted and /goim/nodes/instances
// answer in goim's shapes.
func TestGoimNodesShapes(t *testing.T) {
	mem := memory.New(time.Minute, time.Minute)
	for _, n := range []*pb.NodeInfo{
		{Id: "a", GrpcAddr: "10.0.0.1:3109", Host: "a.example", TcpPort: 3101, WsPort: 3102, Weight: 1, ConnCount: 10, IpCount: 4},
		{Id: "b", GrpcAddr: "10.0.0.2:3109", Host: "b.example", TcpPort: 3101, WsPort: 3102, Weight: 1},
		{Id: "c", GrpcAddr: "10.0.0.3:3109", Host: "c.example", TcpPort: 4101, WsPort: 4102, Weight: 1, ConnCount: 5},
	} {
		if _, err := mem.RenewNode(context.Background(), n); err != nil {
			t.Fatal(err)
		}
	}
	a := newAPI(t, apiOptions{registry: mem})

	r := a.do("GET", "/goim/nodes/weighted?platform=web", "", "", nil)
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(r.Data, &raw); err != nil || r.status != 200 || r.Code != 0 || deref(r.Msg) != "" {
		t.Fatalf("status %d code %d message %v data %s (%v)", r.status, r.Code, deref(r.Msg), r.Data, err)
	}
	for _, f := range []string{"domain", "tcp_port", "ws_port", "heartbeat", "heartbeat_max", "nodes", "backoff"} {
		if _, ok := raw[f]; !ok {
			t.Errorf("goim nodes/weighted lacks %q: %s", f, r.Data)
		}
	}
	var nodes goimNodes
	_ = json.Unmarshal(r.Data, &nodes)
	want := goimNodes{Domain: "b.example", TCPPort: 3101, WSPort: 3102, Heartbeat: 30, HeartbeatMax: 2,
		Nodes: []string{"b.example", "a.example"}}
	if nodes.Domain != want.Domain || nodes.TCPPort != want.TCPPort || nodes.WSPort != want.WSPort || nodes.Heartbeat != want.Heartbeat ||
		nodes.HeartbeatMax != want.HeartbeatMax || !slices.Equal(nodes.Nodes, want.Nodes) || nodes.Backoff == nil || nodes.Backoff.MaxDelay == 0 {
		t.Fatalf("goim nodes/weighted %s, want %+v (least loaded first; only nodes sharing its ports)", r.Data, want)
	}

	r = a.do("GET", "/goim/nodes/instances", "", "", nil)
	var inst []map[string]json.RawMessage
	if err := json.Unmarshal(r.Data, &inst); err != nil || r.status != 200 || len(inst) != 3 {
		t.Fatalf("nodes/instances: status %d data %s (%v), want 3 instances", r.status, r.Data, err)
	}
	for _, f := range []string{"region", "zone", "env", "appid", "hostname", "addrs", "version", "latest_timestamp", "metadata"} {
		if _, ok := inst[0][f]; !ok {
			t.Errorf("an instance lacks %q: %s", f, r.Data)
		}
	}
	var one goimInstance
	for _, in := range inst {
		b, _ := json.Marshal(in)
		var gi goimInstance
		_ = json.Unmarshal(b, &gi)
		if gi.Hostname == "a" {
			one = gi
		}
	}
	if one.Metadata["conn_count"] != "10" || one.Metadata["ip_count"] != "4" || one.Metadata["addrs"] != "a.example" ||
		!slices.Equal(one.Addrs, []string{"grpc://10.0.0.1:3109"}) {
		t.Fatalf("instance a = %+v", one)
	}
	// imcloud's own shape is unchanged.
	r = a.do("GET", "/im/nodes/weighted?platform=web", "", "", nil)
	if !strings.Contains(string(r.Data), `"base_delay_ms"`) || deref(r.Msg) != "ok" {
		t.Fatalf("/im/nodes/weighted %s", r.Data)
	}
}

// panickyRegistry panics once, as a bug would.
type panickyRegistry struct {
	pipeline.Registry
	mu     sync.Mutex
	panics bool
}

func (r *panickyRegistry) Nodes(ctx context.Context) ([]*pb.NodeInfo, error) {
	r.mu.Lock()
	p := r.panics
	r.panics = false
	r.mu.Unlock()
	if p {
		panic("a bug")
	}
	return r.Registry.Nodes(ctx)
}

// TestPanicReleasesTheKey: a request that panics is answered 500 (and
// logged), and leaves its key free, so the retry runs instead of meeting
// 409 for a minute.
func TestPanicReleasesTheKey(t *testing.T) {
	reg := &panickyRegistry{panics: true}
	a := newAPI(t, apiOptions{registry: reg})
	reg.Registry = a.registry
	if r := a.do("POST", "/im/push/all?operation=1000", "", "x", http.Header{"Idempotency-Key": {"p"}}); r.status != http.StatusInternalServerError {
		t.Fatalf("a panicking request: %d %v, want 500", r.status, deref(r.Msg))
	}
	if r := a.do("POST", "/im/push/all?operation=1000", "", "x", http.Header{"Idempotency-Key": {"p"}}); r.status != 200 {
		t.Fatalf("retry after a panic: %d %v, want 200", r.status, deref(r.Msg))
	}
}

// TestAPIKeySchemeIsCaseInsensitive: the Authorization scheme is matched
// without regard to case (RFC 7235); the key itself is not.
func TestAPIKeySchemeIsCaseInsensitive(t *testing.T) {
	const key = "0123456789abcdef-key"
	a := newAPI(t, apiOptions{apiKeys: []string{"another-key-0123456789", key}})
	for _, tt := range []struct {
		name, auth string
		want       int
	}{
		{"Bearer", "Bearer " + key, http.StatusOK},
		{"bearer", "bearer " + key, http.StatusOK},
		{"BEARER", "BEARER " + key, http.StatusOK},
		{"bEaReR", "bEaReR " + key, http.StatusOK},
		{"key in another case", "Bearer " + strings.ToUpper(key), http.StatusUnauthorized},
		{"wrong key", "Bearer 0123456789abcdef-kez", http.StatusUnauthorized},
		{"empty key", "Bearer ", http.StatusUnauthorized},
		{"other scheme", "Basic " + key, http.StatusUnauthorized},
		{"no scheme", key, http.StatusUnauthorized},
		{"none", "", http.StatusUnauthorized},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := http.Header{}
			if tt.auth != "" {
				h.Set("Authorization", tt.auth)
			}
			if got := a.do(http.MethodPost, "/im/push/all?operation=1000", "", "hi", h); got.status != tt.want {
				t.Fatalf("Authorization %q: status %d, want %d", tt.auth, got.status, tt.want)
			}
		})
	}
}

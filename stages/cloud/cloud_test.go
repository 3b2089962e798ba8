package cloud

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// smallReadBuffer makes a client socket with a tiny kernel receive buffer,
// so that a client that stops reading backs up into the server quickly.
func smallReadBuffer() *net.Dialer {
	return &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		if err != nil {
			return err
		}
		return serr
	}}
}

// TestSlowClientIsIsolated: one client in a room stops reading while 100
// others receive every one of 10,000 room messages in order; the slow one
// is closed with 4008 and never holds up a push.
func TestSlowClientIsIsolated(t *testing.T) {
	const (
		receivers = 100
		messages  = 10_000
		round     = 100 // messages pushed before waiting for the receivers
	)
	n := startNode(t, func(c *config.Cloud) { c.SendQueue = 256; c.Sndbuf = 4096 })
	tok := fmt.Appendf(nil, `{"mid":1,"key":"slow","rooms":["live://1"]}`)
	slow := n.dial(t, "ws", smallReadBuffer())
	if _, err := slow.Auth(tok); err != nil {
		t.Fatal(err)
	}

	// Once the node gives up on the slow client, the client reads again:
	// what was already on its way arrives, then the close code.
	slowEnd := make(chan error, 1)
	slowGot := 0
	go func() {
		deadline := time.Now().Add(wait)
		for n.st.SlowConsumers() == 0 && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		for {
			if _, err := slow.Read(); err != nil {
				slowEnd <- err
				return
			}
			slowGot++
		}
	}()

	var received [receivers]atomic.Int64
	errs := make(chan error, receivers)
	var wg sync.WaitGroup
	for i := range receivers {
		transport := []string{"ws", "tcp"}[i%2]
		c := n.connect(t, transport, claims{Mid: int64(i + 2), Rooms: []string{"live://1"}})
		wg.Go(func() {
			for want := range messages {
				p, err := c.Read()
				if err != nil {
					errs <- fmt.Errorf("receiver %d (%s) after %d messages: %w", i, transport, want, err)
					return
				}
				if got := binary.BigEndian.Uint32(p.Body); p.Op != 1000 || got != uint32(want) {
					errs <- fmt.Errorf("receiver %d (%s): message %d is op %d #%d", i, transport, want, p.Op, got)
					return
				}
				received[i].Store(int64(want + 1))
			}
		})
	}

	body := make([]byte, 64)
	for sent := 0; sent < messages; {
		for range round {
			binary.BigEndian.PutUint32(body, uint32(sent))
			n.room(t, "live://1", 1000, body)
			sent++
		}
		// Wait, on a condition with a deadline, for the readers to catch up.
		deadline := time.Now().Add(wait)
		for i := 0; i < receivers; {
			select {
			case err := <-errs:
				t.Fatal(err)
			default:
			}
			if received[i].Load() >= int64(sent) {
				i++
				continue
			}
			if time.Now().After(deadline) {
				t.Fatalf("receiver %d has %d of %d messages after %s", i, received[i].Load(), sent, wait)
			}
			time.Sleep(time.Millisecond)
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	err := <-slowEnd
	if code := client.CloseCode(err); code != closeSlowConsumer {
		t.Fatalf("slow client ended with %v after %d messages, want close code 4008", err, slowGot)
	}
	if slowGot >= messages || n.st.SlowConsumers() != 1 {
		t.Fatalf("slow client got %d of %d messages; %d slow consumers counted, want 1", slowGot, messages, n.st.SlowConsumers())
	}
	t.Logf("slow client got %d of %d messages before 4008", slowGot, messages)
}

// TestConcurrentAuthentication: 2,000 clients connect and authenticate at
// once, and a broadcast then reaches every one of them. They all come
// from one address, so its handshake bound is raised to let them.
func TestConcurrentAuthentication(t *testing.T) {
	const clients = 2000
	n := startNode(t, func(c *config.Cloud) { c.MaxHandshakesPerIP = clients })
	conns := make([]*client.Conn, clients)
	errs := make(chan error, clients)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range clients {
		wg.Go(func() {
			<-start
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			c, err := client.Dial(ctx, n.target([]string{"ws", "tcp"}[i%2]), client.Options{})
			if err != nil {
				errs <- err
				return
			}
			conns[i] = c
			_ = c.SetReadDeadline(time.Now().Add(wait))
			if _, err := c.Auth(fmt.Appendf(nil, `{"mid":%d,"key":"k%d"}`, i+1, i)); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
			}
		})
	}
	close(start)
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	})
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	r, err := n.rpc.Broadcast(context.Background(), broadcastReq(1000, "to all"))
	if err != nil || r.Delivered != clients {
		t.Fatalf("broadcast delivered %v (err %v), want %d", r, err, clients)
	}
	for i, c := range conns {
		p, err := c.Read()
		if err != nil || p.Op != 1000 || string(p.Body) != "to all" {
			t.Fatalf("client %d: %+v %v", i, p, err)
		}
	}
}

// TestDrainFlushesQueuedThenCloses: shutdown writes what is queued, then
// closes with 1001 and reports the session gone.
func TestDrainFlushesQueuedThenCloses(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.SendQueue = 4096 })
	c := n.connect(t, "tcp", claims{Mid: 1, Key: "drained", Rooms: []string{"live://1"}})
	w := n.connect(t, "ws", claims{Mid: 2, Key: "drained-ws", Rooms: []string{"live://1"}})
	const queued = 2000
	for i := range queued {
		n.room(t, "live://1", 1000, fmt.Appendf(nil, "%d", i))
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- n.st.Drain(ctx) }()
	for name, conn := range map[string]*client.Conn{"tcp": c, "ws": w} {
		for i := range queued {
			p, err := conn.Read()
			if err != nil {
				t.Fatalf("%s: message %d: %v", name, i, err)
			}
			if string(p.Body) != fmt.Sprint(i) {
				t.Fatalf("%s: message %d is %q", name, i, p.Body)
			}
		}
		_, err := conn.Read()
		if err == nil {
			t.Fatalf("%s: more after the queued messages", name)
		}
		if name == "ws" && client.CloseCode(err) != websocket.CloseGoingAway {
			t.Fatalf("ws closed with %v, want 1001", err)
		}
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"drained", "drained-ws"} {
		if n.logic.disconnected(key) != 1 {
			t.Fatalf("logic told %d times that %s left, want 1", n.logic.disconnected(key), key)
		}
	}
}

func TestUpstreamRateLimit(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.UpstreamRate = 0.001; c.UpstreamBurst = 3 })
	c := n.connect(t, "ws", claims{Mid: 1})
	for i := range 3 {
		seq, err := c.Send(wire.OpSendMsg, []byte("up"))
		if err != nil {
			t.Fatal(err)
		}
		p, err := c.Read()
		if err != nil || p.Op != wire.OpSendMsgReply || p.Seq != seq {
			t.Fatalf("message %d: reply %+v, %v", i, p, err)
		}
	}
	if _, err := c.Send(wire.OpSendMsg, []byte("one too many")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(); client.CloseCode(err) != closeRateLimited {
		t.Fatalf("over the limit: %v, want close 4029", err)
	}
}

func TestHeartbeatCountsComeFromLogic(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	n.logic.rooms["live://1"] = 12345
	if err := n.st.Register(context.Background()); err != nil {
		t.Fatal(err)
	}
	c := n.connect(t, "tcp", claims{Mid: 1, Rooms: []string{"live://1"}})
	if _, err := c.Send(wire.OpHeartbeat, nil); err != nil {
		t.Fatal(err)
	}
	p, err := c.Read()
	if err != nil || p.Op != wire.OpHeartbeatReply || binary.BigEndian.Uint32(p.Body) != 12345 {
		t.Fatalf("heartbeat reply %+v %v, want logic's count 12345", p, err)
	}
}

func TestAllowedOrigins(t *testing.T) {
	tests := []struct {
		name    string
		allowed []string
		origin  string
		ok      bool
	}{
		{"no origin header (not a browser)", nil, "", true},
		{"same origin by default", nil, "http://HOST", true},
		{"other origin refused by default", nil, "http://evil.example", false},
		{"listed origin", []string{"https://app.example"}, "https://app.example", true},
		{"unlisted origin", []string{"https://app.example"}, "https://evil.example", false},
		{"any origin when explicit", []string{"*"}, "https://anything.example", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := startNode(t, func(c *config.Cloud) { c.AllowedOrigins = tt.allowed })
			h := http.Header{}
			if tt.origin != "" {
				h.Set("Origin", replaceHost(tt.origin, n.ws.Listener.Addr().String()))
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			c, err := client.Dial(ctx, n.wsURL, client.Options{Header: h})
			if (err == nil) != tt.ok {
				t.Fatalf("dial with Origin %q: err %v, want ok=%v", h.Get("Origin"), err, tt.ok)
			}
			if c != nil {
				_ = c.Close()
			}
		})
	}
}

func replaceHost(origin, host string) string {
	if origin == "http://HOST" {
		return "http://" + host
	}
	return origin
}

// TestRetriedCallDeliversOnce: job retries a call whose deadline passed
// after the node had already taken it; the message id keeps it single.
func TestRetriedCallDeliversOnce(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	c := n.connect(t, "tcp", claims{Mid: 1, Key: "once", Rooms: []string{"live://1"}})
	room := &pb.BroadcastRoomReq{RoomId: "live://1", Proto: &pb.Proto{Op: 1000, Body: []byte("a"), Id: "m1"}}
	for range 2 {
		if _, err := n.rpc.BroadcastRoom(context.Background(), room); err != nil {
			t.Fatal(err)
		}
	}
	keys := &pb.PushMsgReq{Keys: []string{"once"}, Proto: &pb.Proto{Op: 1000, Body: []byte("b"), Id: "m2"}}
	for range 2 {
		if _, err := n.rpc.PushMsg(context.Background(), keys); err != nil {
			t.Fatal(err)
		}
	}
	fence := &pb.PushMsgReq{Keys: []string{"once"}, Proto: &pb.Proto{Op: 1000, Body: []byte("fence")}}
	if _, err := n.rpc.PushMsg(context.Background(), fence); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"a", "b", "fence"} {
		p, err := c.Read()
		if err != nil || string(p.Body) != want {
			t.Fatalf("got %q (%v), want %q: a retried call was delivered twice", p.Body, err, want)
		}
	}
}

// TestKeyOfflineAtFirstCallGetsTheRetry: a key that was not connected
// when a message first came (its client had not reconnected after a
// restart) gets it when job calls again with the same id, and a key that
// got it does not get it twice, also when the whole message comes again.
func TestKeyOfflineAtFirstCallGetsTheRetry(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	early := n.connect(t, "tcp", claims{Mid: 1, Key: "early", Rooms: []string{"live://1"}})
	msg := &pb.Proto{Op: 1000, Body: []byte("m"), Id: "m-retry"}
	r, err := n.rpc.PushMsg(context.Background(), &pb.PushMsgReq{Keys: []string{"early", "late"}, Proto: msg})
	if err != nil {
		t.Fatal(err)
	}
	if r.Delivered != 1 || len(r.Offline) != 1 || r.Offline[0] != "late" {
		t.Fatalf("first call: delivered %d, offline %v; want 1, [late]", r.Delivered, r.Offline)
	}
	late := n.connect(t, "tcp", claims{Mid: 2, Key: "late", Rooms: []string{"live://1"}})
	// The whole message again, as after job restarted: "early" has it.
	r, err = n.rpc.PushMsg(context.Background(), &pb.PushMsgReq{Keys: []string{"early", "late"}, Proto: msg})
	if err != nil {
		t.Fatal(err)
	}
	if r.Delivered != 2 || len(r.Offline) != 0 {
		t.Fatalf("second call: delivered %d, offline %v; want 2, none", r.Delivered, r.Offline)
	}
	fence := &pb.PushMsgReq{Keys: []string{"early", "late"}, Proto: &pb.Proto{Op: 1000, Body: []byte("fence")}}
	if _, err := n.rpc.PushMsg(context.Background(), fence); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]*client.Conn{"early": early, "late": late} {
		for _, want := range []string{"m", "fence"} {
			p, err := c.Read()
			if err != nil || string(p.Body) != want {
				t.Fatalf("%s got %q (%v), want %q", name, p.Body, err, want)
			}
		}
	}
}

// TestDrainLeavesTheNodeListFirst: Drain reports the node without its
// public host (so /im/nodes/weighted stops offering it) before it closes
// a client, and the node says it is draining.
func TestDrainLeavesTheNodeListFirst(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	n.st.self.Host = "push1.example.com"
	c := n.connect(t, "tcp", claims{Mid: 1, Key: "k"})
	if got := n.st.info().Host; got != "push1.example.com" {
		t.Fatalf("host %q before Drain", got)
	}
	if n.st.Draining() {
		t.Fatal("draining before Drain")
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	drained := make(chan error, 1)
	go func() { drained <- n.st.Drain(ctx) }()
	// The client's close comes after the report.
	if _, err := c.Read(); err == nil {
		t.Fatal("the client was not closed")
	}
	n.logic.mu.Lock()
	last := n.logic.lastNode
	n.logic.mu.Unlock()
	if last == nil || last.Host != "" {
		t.Fatalf("the last report before the close: %+v, want no public host", last)
	}
	if !n.st.Draining() {
		t.Fatal("not draining during Drain")
	}
	if err := <-drained; err != nil {
		t.Fatal(err)
	}
}

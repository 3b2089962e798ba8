package cloud

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/wire"
)

// call sends op with body and waits for its reply (op+1, same sequence),
// skipping pushes.
func call(t *testing.T, c *client.Conn, op int32, body string) wire.Packet {
	t.Helper()
	seq, err := c.Send(op, []byte(body))
	if err != nil {
		t.Fatalf("send op %d: %v", op, err)
	}
	for {
		p, err := c.Read()
		if err != nil {
			t.Fatalf("op %d %q: no reply: %v (close code %d)", op, body, err, client.CloseCode(err))
		}
		if p.Op == op+1 && p.Seq == seq {
			return p
		}
	}
}

// closedWith reads until the connection ends and checks the WebSocket
// close code.
func closedWith(t *testing.T, c *client.Conn, code int) {
	t.Helper()
	for {
		p, err := c.Read()
		if err != nil {
			if got := client.CloseCode(err); got != code {
				t.Fatalf("connection ended with %v (code %d), want close code %d", err, got, code)
			}
			return
		}
		if p.Op == wire.OpChangeRoomReply || p.Op == wire.OpSubReply {
			t.Fatalf("got reply op %d %q, want close code %d", p.Op, p.Body, code)
		}
	}
}

// TestInvalidRoomClosesAndNodeStaysReported: op 12 with a room name that
// is not UTF-8 (or otherwise not a room) closes the connection with 1002
// and never reaches the node's room counts, so its reports to logic still
// marshal. On main the room "\xff" joined, and every RenewOnline failed.
func TestInvalidRoomClosesAndNodeStaysReported(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	for _, room := range []string{"\xff", "live://\xff", "live://a\x00", "live://a b", "live://a,b", "live://a*",
		"norooms", "://1", "live://", "live://" + strings.Repeat("x", wire.MaxRoomLen)} {
		t.Run(fmt.Sprintf("%q", room), func(t *testing.T) {
			c := n.connect(t, "ws", claims{Mid: 1, Key: "k", AnyRoom: true})
			if _, err := c.Send(wire.OpChangeRoom, []byte(room)); err != nil {
				t.Fatal(err)
			}
			closedWith(t, c, closeProtocol)
			if err := n.st.renew(context.Background()); err != nil {
				t.Fatalf("report to logic after op 12 %q: %v", room, err)
			}
			if _, err := proto.Marshal(n.st.info()); err != nil {
				t.Fatalf("node info does not marshal: %v", err)
			}
		})
	}
	if _, _, err := n.logic.calls(); err != nil {
		t.Fatalf("a report did not marshal: %v", err)
	}
}

// TestRoomAuthorization: op 12 joins only a room the token grants, by
// exact name or by a pattern; any other closes with 4403 and joins
// nothing. A token with any_room (insecure-json) joins any room.
func TestRoomAuthorization(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	tok := claims{Mid: 1, Key: "k", Rooms: []string{"public://lobby", "live://*"}}
	tests := []struct {
		name string
		tok  claims
		room string
		ok   bool
	}{
		{"exact token room", tok, "public://lobby", true},
		{"pattern", tok, "live://7", true},
		{"leave", tok, "", true},
		{"other room", tok, "private://board-meeting", false},
		{"other type with pattern's prefix", tok, "live2://x", false},
		{"exact is not a prefix", tok, "public://lobby2", false},
		{"no grants", claims{Mid: 1, Key: "k"}, "live://1", false},
		{"any room", claims{Mid: 1, Key: "k", AnyRoom: true}, "private://board-meeting", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := n.connect(t, "ws", tt.tok)
			if !tt.ok {
				if _, err := c.Send(wire.OpChangeRoom, []byte(tt.room)); err != nil {
					t.Fatal(err)
				}
				closedWith(t, c, closeForbidden)
				if got := n.room(t, tt.room, 1000, []byte("secret")); got != 0 {
					t.Fatalf("push to %s reached %d clients, want 0", tt.room, got)
				}
				return
			}
			if p := call(t, c, wire.OpChangeRoom, tt.room); string(p.Body) != tt.room {
				t.Fatalf("op 13 body %q, want %q", p.Body, tt.room)
			}
			if tt.room == "" {
				return
			}
			if got := n.room(t, tt.room, 1000, []byte("hi")); got != 1 {
				t.Fatalf("push to %s reached %d clients, want 1", tt.room, got)
			}
		})
	}
}

// TestAcceptsAuthorizedAndBounded: op 14 adds only operations the token's
// accepts list (4403 otherwise), and no more than cloud.max_accepts when
// the token lists none (1008). On main op 14 grew the set without bound.
func TestAcceptsAuthorizedAndBounded(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.MaxAccepts = 8 })
	ops := func(from, count int) string {
		var b strings.Builder
		for i := range count {
			fmt.Fprintf(&b, "%d,", from+i)
		}
		return b.String()
	}

	c := n.connect(t, "ws", claims{Mid: 1, Key: "a", Accepts: []int32{1000, 1001}})
	call(t, c, wire.OpSub, "1001,1000")
	call(t, c, wire.OpUnsub, "1000")
	if _, err := c.Send(wire.OpSub, []byte("1001,1002")); err != nil {
		t.Fatal(err)
	}
	closedWith(t, c, closeForbidden)

	c = n.connect(t, "ws", claims{Mid: 2, Key: "b"})
	call(t, c, wire.OpSub, ops(1000, 8))
	call(t, c, wire.OpSub, ops(1000, 8)) // the same ones again
	call(t, c, wire.OpUnsub, "1007")
	call(t, c, wire.OpSub, "2000")
	if _, err := c.Send(wire.OpSub, []byte("2001")); err != nil {
		t.Fatal(err)
	}
	closedWith(t, c, closePolicy)

	c = n.connect(t, "ws", claims{Mid: 3, Key: "c", AnyRoom: true, Accepts: []int32{1000}})
	call(t, c, wire.OpSub, "1005") // insecure-json: any operation
}

// TestTooManyTokenRoomsRefused: a token joining more rooms than
// cloud.max_rooms is refused with 4403 and its session given back to
// logic.
func TestTooManyTokenRoomsRefused(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.MaxRooms = 2 })
	n.connect(t, "ws", claims{Mid: 1, Key: "ok", Rooms: []string{"live://1", "live://2", "live://*"}})

	c := n.dial(t, "ws", nil)
	if _, err := c.Auth([]byte(`{"mid":2,"key":"many","rooms":["live://1","live://2","live://3"]}`)); client.CloseCode(err) != closeForbidden {
		t.Fatalf("auth with 3 rooms: %v, want close code %d", err, closeForbidden)
	}
	waitFor(t, "logic to be told the refused session is gone", func() bool { return n.logic.disconnected("many") == 1 })
}

// TestQueuedBytesBounded: a client that stops reading while its requests
// echo 4 KB bodies is a slow consumer once cloud.send_queue_bytes is
// queued, long before cloud.send_queue packets. On main only packets
// counted: 1024 echoes of 4 KB pinned ~4 MB.
func TestQueuedBytesBounded(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) {
		c.SendQueueBytes = 64 << 10
		c.Sndbuf = 4096
		c.ClientBurst = 1000
	})
	// TCP: the close code is the count; a WebSocket close frame would be
	// lost to the reset that closing with unread requests causes.
	c := n.dial(t, "tcp", smallReadBuffer())
	if _, err := c.Auth([]byte(`{"mid":1,"key":"k"}`)); err != nil {
		t.Fatal(err)
	}
	body := strings.Repeat("1,", 2000) // unsubscribes nothing; echoed whole
	for range 200 {
		if _, err := c.Send(wire.OpUnsub, []byte(body)); err != nil || n.st.SlowConsumers() > 0 {
			break
		}
	}
	waitFor(t, "the client to be closed as a slow consumer", func() bool { return n.st.SlowConsumers() == 1 })
	for {
		if _, err := c.Read(); err != nil {
			break // closed
		}
	}
	// Another client is served.
	call(t, n.connect(t, "tcp", claims{Mid: 2, Key: "other"}), wire.OpHeartbeat, "")
}

// TestClientPacketRateLimited: every operation costs a token; a client
// sending heartbeats beyond cloud.client_burst is closed with 4029. On
// main only op 4 was limited.
func TestClientPacketRateLimited(t *testing.T) {
	// A rate that refills nothing while the test runs, however slowly.
	n := startNode(t, func(c *config.Cloud) { c.ClientRate = 1e-6; c.ClientBurst = 20 })
	c := n.connect(t, "ws", claims{Mid: 1, Key: "k"})
	for range 20 {
		call(t, c, wire.OpHeartbeat, "")
	}
	if _, err := c.Send(wire.OpHeartbeat, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(); client.CloseCode(err) != closeRateLimited {
		t.Fatalf("21st packet: %v, want close code %d", err, closeRateLimited)
	}
	// Another client is not affected.
	call(t, n.connect(t, "tcp", claims{Mid: 2, Key: "other"}), wire.OpHeartbeat, "")
}

// TestHeartbeatsForwardedSparingly: a client's heartbeats are all
// answered, but logic hears of them at most once per a third of its
// session TTL: on main each one was a registry write.
func TestHeartbeatsForwardedSparingly(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	c := n.connect(t, "tcp", claims{Mid: 1, Key: "k"})
	for range 50 {
		call(t, c, wire.OpHeartbeat, "")
	}
	call(t, c, wire.OpUnsub, "") // a fence: handled after the last heartbeat
	if hb, _, _ := n.logic.calls(); hb != 0 {
		t.Fatalf("logic got %d heartbeats, want 0 (Connect renewed the session)", hb)
	}
}

// TestHeartbeatForwardedAfterInterval: once the interval passed, the next
// heartbeat does reach logic.
func TestHeartbeatForwardedAfterInterval(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	c := n.connect(t, "tcp", claims{Mid: 1, Key: "k"})
	ch := bucketFor(n.st.buckets, "k").get("k")
	ch.mu.Lock()
	ch.heartbeatAt -= int64(ch.grants.heartbeatEvery) // as if the interval passed
	ch.mu.Unlock()
	call(t, c, wire.OpHeartbeat, "")
	call(t, c, wire.OpHeartbeat, "")
	call(t, c, wire.OpUnsub, "") // fence
	if hb, _, _ := n.logic.calls(); hb != 1 {
		t.Fatalf("logic got %d heartbeats, want 1", hb)
	}
}

// TestRoomAnnouncementsBatched: op 12 to ever new rooms makes reports to
// logic no more often than one per minAnnounceGap, each serving every
// join waiting. On main each op 12 to a new room sent the node's whole
// room map at once (~9,000 times/s from one client).
func TestRoomAnnouncementsBatched(t *testing.T) {
	n := startNode(t, func(c *config.Cloud) { c.ClientBurst = 1000 })
	const clients, joins = 4, 25
	conns := make([]*client.Conn, clients)
	for i := range conns {
		conns[i] = n.connect(t, "tcp", claims{Mid: int64(i + 1), Key: fmt.Sprint("k", i), Rooms: []string{"live://*"}})
	}
	_, before, _ := n.logic.calls()
	start := time.Now()
	errs := make(chan error, clients)
	for i, c := range conns {
		go func() {
			for j := range joins {
				room := fmt.Sprintf("live://%d-%d", i, j)
				seq, err := c.Send(wire.OpChangeRoom, []byte(room))
				for err == nil {
					var p wire.Packet
					if p, err = c.Read(); err == nil && p.Op == wire.OpChangeRoomReply && p.Seq == seq {
						break
					}
				}
				if err != nil {
					errs <- fmt.Errorf("client %d join %d: %w", i, j, err)
					return
				}
			}
			errs <- nil
		}()
	}
	for range clients {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	elapsed := time.Since(start)
	_, after, _ := n.logic.calls()
	reports := after - before
	if limit := int(elapsed/minAnnounceGap) + 2; reports > limit {
		t.Fatalf("%d op 12 to new rooms made %d reports in %v, want at most %d", clients*joins, reports, elapsed, limit)
	}
	t.Logf("%d joins of new rooms: %d reports in %v", clients*joins, reports, elapsed)
}

// TestUpstreamFailureClosesTryAgain: an op 4 message the broker refuses
// closes the client with 1013 (try again later), counted; on main the
// close was a normal one, which tells a client nothing was lost.
func TestUpstreamFailureClosesTryAgain(t *testing.T) {
	n := startNode(t, func(*config.Cloud) {})
	c := n.connect(t, "ws", claims{Mid: 1, Key: "k"})
	if err := n.upstream.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Send(wire.OpSendMsg, []byte("hello")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(); client.CloseCode(err) != closeTryAgain {
		t.Fatalf("after a refused upstream message: %v, want close code %d", err, closeTryAgain)
	}
	if got := n.st.UpstreamFailures(); got != 1 {
		t.Fatalf("UpstreamFailures = %d, want 1", got)
	}
}

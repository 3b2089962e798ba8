package e2e

import (
	"fmt"
	"net/url"
	"strconv"
	"testing"
	"time"

	"imcloud/pipeline/events"
	"imcloud/proto/client"
	"imcloud/proto/wire"
	"imcloud/stages/logic/token"
)

// TestAcksRedeliverUnacknowledged is issue 12's Acks bullet: a user
// offline for 500 pushes; a fresh connection without positions receives
// all 500, in order; after acking and reconnecting it receives none of
// them again, only what came since.
func TestAcksRedeliverUnacknowledged(t *testing.T) {
	h := start(t, "history.user.acks=true", "events.enabled=true", "events.kinds=acked")
	log := subscribeEvents(t, h)
	const mid, total = 77, 500
	push := func(i int) {
		h.push(request{path: "/im/push/mids", query: url.Values{"operation": {"1000"}, "mids": {strconv.Itoa(mid)}}, body: fmt.Sprint("m", i)})
	}
	for i := 1; i <= total; i++ {
		push(i)
	}

	// A fresh app start: no saved positions, a new key.
	fresh := func(key string) (*client.Conn, client.AuthReply) {
		c := h.dial("ws")
		reply, err := c.Auth([]byte(h.token(token.Claims{Mid: mid, Key: key, Recover: true}, time.Hour)))
		if err != nil {
			t.Fatalf("auth %s: %v", key, err)
		}
		if !reply.Recover || !reply.Acks {
			t.Fatalf("auth reply %+v: want recover and acks", reply)
		}
		if _, err := c.Recover(nil); err != nil {
			t.Fatalf("recover %s: %v", key, err)
		}
		return c, reply
	}
	c, reply := fresh("first")
	// The user stream starts at the acknowledged position: none yet.
	for _, s := range reply.Streams {
		if s.Stream == "user:77" && (s.Pos != 0 || s.Epoch == "") {
			t.Fatalf("op 8 streams %+v: want user:77 from position 0", reply.Streams)
		}
	}
	var epoch string
	for i := 1; i <= total; i++ {
		m := readStreamMsg(t, c)
		if m.Stream != "user:77" || m.Pos != uint64(i) || string(m.Body) != fmt.Sprint("m", i) || m.Gap || m.Dup {
			t.Fatalf("message %d: %s %d %q gap %v dup %v, want user:77 %d m%d", i, m.Stream, m.Pos, m.Body, m.Gap, m.Dup, i, i)
		}
		epoch = m.Epoch
	}
	if ok, err := c.AckUser(mid); !ok || err != nil {
		t.Fatalf("ack: %v %v", ok, err)
	}
	// Logic took it once the acked event is out.
	deadline := time.Now().Add(wait)
	for acked := false; !acked; {
		for _, ev := range log.snapshot() {
			if ev.Kind == events.Acked && ev.Mid == mid && ev.Key == "first" && ev.Position != nil &&
				ev.Position.Stream == "user:77" && ev.Position.Epoch == epoch && ev.Position.Pos == total {
				acked = true
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no acked event of position %d: %+v", total, log.snapshot())
		}
		time.Sleep(5 * time.Millisecond)
	}
	_ = c.Close()

	// The next fresh start gets nothing of the 500, only what is new.
	c2, reply2 := fresh("second")
	for _, s := range reply2.Streams {
		if s.Stream == "user:77" && (s.Pos != total || s.Epoch != epoch) {
			t.Fatalf("op 8 streams %+v: want user:77 from %d", reply2.Streams, total)
		}
	}
	push(total + 1)
	if m := readStreamMsg(t, c2); m.Stream != "user:77" || m.Pos != total+1 || string(m.Body) != fmt.Sprint("m", total+1) {
		t.Fatalf("after the ack: %s %d %q, want only the new message, position %d", m.Stream, m.Pos, m.Body, total+1)
	}
}

// readStreamMsg reads the next op 20 message, skipping other packets.
func readStreamMsg(t *testing.T, c *client.Conn) client.Message {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(wait))
	for {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("read: %v", err)
		}
		if m.Stream != "" {
			return m
		}
		if m.Op >= wire.MinBusinessOp {
			t.Fatalf("a business message without its position (op %d %q): the connection opted in", m.Op, m.Body)
		}
	}
}

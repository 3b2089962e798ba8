package cloud

import (
	"fmt"
	"testing"
	"time"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/client"
	"imcloud/proto/wire"
)

// editEntry changes the kept entry of stream at pos (which must exist).
func (h *fakeHist) editEntry(t *testing.T, stream string, pos uint64, keys []string, void bool) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	e := h.stream(stream).entries[pos]
	if e == nil {
		t.Fatalf("%s has no entry at %d", stream, pos)
	}
	e.Keys, e.Void = keys, void
}

// TestOrderGapVoidPassedOver: a void position (its message was never
// accepted) that a gap fill finds is passed over silently: nothing is
// delivered for it and it is counted filled, not skipped.
func TestOrderGapVoidPassedOver(t *testing.T) {
	n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
	c := n.connect(t, "ws", claims{Mid: 1, Rooms: []string{"live://v"}})
	stream := pipeline.RoomStream("live://v")
	n.roomAt(t, "live://v", "e1", 1, "", "1")
	h.set(stream, "e1", 3, 1)
	h.editEntry(t, stream, 2, nil, true)
	n.roomAt(t, "live://v", "e1", 3, "", "3")
	n.roomAt(t, "live://v", "e1", 4, "", "4")
	expectBodies(t, c, "1", "3", "4")
	if got := n.st.order.skipped.Load(); got != 0 {
		t.Fatalf("skipped %d, want 0: a void position is nothing lost", got)
	}
	if got := n.st.order.filled.Load(); got != 1 {
		t.Fatalf("filled %d, want 1", got)
	}
}

// TestOrderGapKeyedEntry: a key push a gap fill finds in the user's
// stream goes only to its keys' connections; a void one to none.
func TestOrderGapKeyedEntry(t *testing.T) {
	n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
	a := n.connect(t, "ws", claims{Mid: 9, Key: "a"})
	c := n.connect(t, "tcp", claims{Mid: 9, Key: "c"})
	stream := pipeline.UserStream(9)
	n.pushKeysAt(t, 9, 1, "m1", "1", "a", "c")
	expectBodies(t, a, "1")
	expectBodies(t, c, "1")
	h.set(stream, "e1", 4, 1)
	h.editEntry(t, stream, 2, []string{"a", "elsewhere"}, false) // for a (and a key on another node)
	h.editEntry(t, stream, 3, nil, true)
	n.pushKeysAt(t, 9, 4, "m4", "4", "a", "c")
	expectBodies(t, a, "2", "4")
	expectBodies(t, c, "4")
	if got := n.st.order.skipped.Load(); got != 0 {
		t.Fatalf("skipped %d, want 0", got)
	}
}

// TestRecoverVoidAndKeyed: recovery of a user stream sends the mid pushes
// and the key pushes for the recovering connection's key, never a key
// push for another device nor a void position; a room's void position
// is not sent either.
func TestRecoverVoidAndKeyed(t *testing.T) {
	n, h := recoverNode(t, func(*config.Cloud) {})
	user, room := pipeline.UserStream(21), pipeline.RoomStream("live://vk")
	for i := 1; i <= 5; i++ {
		h.appendMsg(user, fmt.Sprint("u", i))
		h.appendMsg(room, fmt.Sprint("r", i))
	}
	h.editEntry(t, user, 2, []string{"other"}, false)
	h.editEntry(t, user, 3, []string{"other", "mine"}, false)
	h.editEntry(t, user, 4, nil, true)
	h.editEntry(t, room, 2, nil, true)
	c, _ := n.connectWith(t, "ws", claims{Mid: 21, Key: "mine", Rooms: []string{"live://vk"}, Recover: true}, client.NewPositions())
	r, err := c.Recover([]wire.StreamPos{{Stream: user, Epoch: "e1"}, {Stream: room, Epoch: "e1"}})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range r.Streams {
		if !s.Recovered {
			t.Fatalf("op 22 %v", r)
		}
	}
	var got []string
	for len(got) < 7 {
		m, err := c.ReadMessage()
		if err != nil {
			t.Fatalf("read after %v: %v", got, err)
		}
		if m.Stream != "" {
			got = append(got, fmt.Sprintf("%s@%d=%s", m.Stream, m.Pos, m.Body))
		}
	}
	var us, rs []string
	for _, g := range got {
		if g[:5] == "user:" {
			us = append(us, g)
		} else {
			rs = append(rs, g)
		}
	}
	if w := "[user:21@1=u1 user:21@3=u3 user:21@5=u5]"; fmt.Sprint(us) != w {
		t.Fatalf("user stream recovered %v, want %s", us, w)
	}
	if w := "[room:live://vk@1=r1 room:live://vk@3=r3 room:live://vk@4=r4 room:live://vk@5=r5]"; fmt.Sprint(rs) != w {
		t.Fatalf("room stream recovered %v, want %s", rs, w)
	}
}

// TestOrderPartlyPublishedPushRetried: a user push published to this node
// but not to another (the broker failed part-way; logic answered 503 and
// voided its position) is delivered here; its retry with the same
// Idempotency-Key reproduces the per-node message id at a new position,
// which this node neither delivers again live nor when a gap fill finds
// it, and the stream goes on.
func TestOrderPartlyPublishedPushRetried(t *testing.T) {
	n, h := orderNode(t, 20*time.Millisecond, func(*config.Cloud) {})
	a := n.connect(t, "ws", claims{Mid: 6, Key: "a"})
	stream := pipeline.UserStream(6)
	h.set(stream, "e1", 3, 1)
	// The first attempt: "m" at 1, published for this node.
	n.pushKeysAt(t, 6, 1, stream+"/e1/1/node-a", "m", "a")
	expectBodies(t, a, "m")
	h.editEntry(t, stream, 1, nil, true) // its 503 voided 1
	// The retry took 2 with the same id; its history entry keeps "m"'s id.
	h.mu.Lock()
	h.streams[stream].entries[2].Id = stream + "/e1/1"
	h.mu.Unlock()
	if r := n.pushKeysAt(t, 6, 2, stream+"/e1/1/node-a", "m again", "a"); r.Delivered != 1 {
		t.Fatalf("retry: %+v, want it counted delivered (it was)", r)
	}
	n.pushKeysAt(t, 6, 3, "next/node-a", "next", "a")
	expectBodies(t, a, "next")
	// And when job's retry is slower than the next push, the gap fill
	// finds the retry's entry and passes over it for a.
	h.appendMsg(stream, "other") // 4: another such push, delivered here
	h.mu.Lock()
	h.streams[stream].entries[4].Id = "other"
	h.mu.Unlock()
	n.pushKeysAt(t, 6, 4, "other/node-a", "other", "a")
	expectBodies(t, a, "other")
	h.appendMsg(stream, "other again") // 5: its retry, entry id "other" below
	h.mu.Lock()
	h.streams[stream].entries[5].Id = "other"
	h.mu.Unlock()
	sp := h.appendMsg(stream, "after") // 6
	n.pushKeysAt(t, 6, sp.Pos, "after/node-a", "after", "a")
	expectBodies(t, a, "after")
	if got := n.st.order.skipped.Load(); got != 0 {
		t.Fatalf("skipped %d, want 0", got)
	}
}

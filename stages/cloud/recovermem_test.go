package cloud

import (
	"bytes"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
	"imcloud/proto/wire"
)

// boundedRecoverNode is a node whose logic keeps history and whose
// recoveries have the bounds rb.
func boundedRecoverNode(t *testing.T, edit func(*config.Cloud), rb recoverBounds) (*node, *fakeHist) {
	t.Helper()
	h := newFakeHist()
	n := startNodeWith(t, func(c *config.Cloud) {
		c.OrderGapWait = 50 * time.Millisecond
		edit(c)
	}, slog.New(slog.DiscardHandler), &rb)
	n.logic.mu.Lock()
	n.logic.hist = h
	n.logic.mu.Unlock()
	return n, h
}

// setBig makes stream keep positions 1..top, each with a 4,000-byte body
// (one slice shared by all: the fake's memory is not the node's).
func (h *fakeHist) setBig(stream string, top uint64) {
	body := bytes.Repeat([]byte("x"), 4000)
	h.mu.Lock()
	defer h.mu.Unlock()
	fs := &fakeStream{epoch: "e1", top: top, keptFrom: 1, entries: map[uint64]*pb.HistoryEntry{}}
	for p := uint64(1); p <= top; p++ {
		fs.entries[p] = &pb.HistoryEntry{Pos: p, Id: fmt.Sprint(stream, "/", p), Op: 1000, Body: body}
	}
	h.streams[stream] = fs
}

// pageCost is what one full page of recovery pins before it is read.
const pageCost = recoverPage * recoverEntryCost

// TestRecoverSlowReaderBounded: a client that reads its recovery slowly
// (one packet every 50 ms, far under the pace) pins at most one page at
// a time and is closed as a slow consumer once it falls behind the
// whole-recovery pace — not kept on for as long as it reads a packet
// now and then — and what it pinned is released.
func TestRecoverSlowReaderBounded(t *testing.T) {
	rb := recoverBounds{bytes: 4 * pageCost, grace: 300 * time.Millisecond, rate: 64 << 20, perEntry: 10 * time.Microsecond, held: maxRecoverHeld}
	n, h := boundedRecoverNode(t, func(c *config.Cloud) {
		c.SendQueue = 16
		c.SendQueueBytes = 64 << 10
	}, rb)
	user := pipeline.UserStream(50)
	const missed = 5000 // 20 MB: more than the sockets' buffers hold
	h.setBig(user, missed)
	c, _ := n.connectWith(t, "tcp", claims{Mid: 50, Key: "k50", Recover: true}, nil)
	r, err := c.Recover([]wire.StreamPos{{Stream: user, Epoch: "e1"}})
	if err != nil || !r.Streams[0].Recovered {
		t.Fatalf("op 22 %+v, %v", r, err)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tick := time.NewTicker(50 * time.Millisecond) // the client's pace, not synchronisation
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := c.Read(); err != nil {
					return
				}
			}
		}
	}()
	defer func() { close(stop); _ = c.Close(); wg.Wait() }()
	// waitFor's 5 s is under the write deadline (10 s): the pace closes it.
	waitFor(t, "the slow reader closed", func() bool { return n.st.SlowConsumers() == 1 })
	waitFor(t, "its pages released", func() bool { used, _ := n.st.recoverBytes.usage(); return used == 0 })
	if _, peak := n.st.recoverBytes.usage(); peak > pageCost || peak == 0 {
		t.Fatalf("one slow recovery pinned up to %d bytes, want one page (%d) at most", peak, pageCost)
	}
}

// TestRecoverManyWithinNodeBudget: many connections recovering at once
// never pin more than the node's byte budget together, and each still
// gets every missed message, in order.
func TestRecoverManyWithinNodeBudget(t *testing.T) {
	rb := defaultRecoverBounds()
	rb.bytes = 3 * pageCost
	n, h := boundedRecoverNode(t, func(c *config.Cloud) {
		c.MaxHandshakesPerIP = 1000
		c.SendQueue = 16
		c.SendQueueBytes = 64 << 10
	}, rb)
	room := pipeline.RoomStream("live://mem")
	const missed, clients = 300, 20
	h.setBig(room, missed)
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, _ := n.connectWith(t, "ws", claims{Mid: int64(200 + i), Rooms: []string{"live://mem"}, Recover: true}, nil)
			r, err := c.Recover([]wire.StreamPos{{Stream: room, Epoch: "e1"}})
			if err != nil || !r.Streams[0].Recovered {
				t.Errorf("client %d: op 22 %+v, %v", i, r, err)
				return
			}
			for want := uint64(1); want <= missed; want++ {
				m, err := c.ReadMessage()
				if err != nil {
					t.Errorf("client %d: read at %d: %v", i, want, err)
					return
				}
				if m.Stream == "" {
					want--
					continue
				}
				if m.Pos != want || m.Gap || m.Dup {
					t.Errorf("client %d: position %d (gap %v dup %v), want %d", i, m.Pos, m.Gap, m.Dup, want)
					return
				}
			}
		}()
	}
	wg.Wait()
	waitFor(t, "pages released", func() bool { used, _ := n.st.recoverBytes.usage(); return used == 0 })
	_, peak := n.st.recoverBytes.usage()
	if peak > rb.bytes || peak < pageCost {
		t.Fatalf("recoveries pinned up to %d bytes together, want at least a page (%d) and at most the budget %d", peak, pageCost, rb.bytes)
	}
}

package cloud

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"imcloud/pipeline"
	"imcloud/pipeline/config"
	"imcloud/proto/pb"
)

// TestOrderUnderJobLikeDelivery drives a room and a user stream as logic
// and job do: logic accepts positions one after another into history,
// several job workers deliver them concurrently, a few late by several
// gap waits (so that gap fills race job's copies and new arrivals), a
// few twice (a retry). The client must get every position once, rising.
// This found a fill that took its history read's top as final: a message
// that arrived during the read, past that top, went out ahead of its
// predecessors (room 121 after 122 in TestIntegrationKillCloudRecover).
func TestOrderUnderJobLikeDelivery(t *testing.T) {
	const (
		n       = 3000
		workers = 4
		gap     = 5 * time.Millisecond
	)
	for _, kind := range []string{"room", "room batches", "user"} {
		t.Run(kind, func(t *testing.T) {
			node, h := orderNode(t, gap, func(c *config.Cloud) {
				c.SendQueue = 1 << 16
				c.SendQueueBytes = 1 << 28
			})
			// History reads take a while: arrivals race them.
			h.mu.Lock()
			h.delay = time.Millisecond
			h.lag = 2 * time.Millisecond
			h.mu.Unlock()
			const mid, room = 11, "live://stress"
			c := node.connect(t, "tcp", claims{Mid: mid, Key: "k", Rooms: []string{room}})
			stream := pipeline.RoomStream(room)
			if kind == "user" {
				stream = pipeline.UserStream(mid)
			}
			deliver := func(ps ...*pb.Proto) {
				var err error
				if kind == "room batches" {
					_, err = node.rpc.BroadcastRoom(context.Background(), &pb.BroadcastRoomReq{RoomId: room, Batch: ps})
					if err != nil {
						t.Error(err)
					}
					return
				}
				p := ps[0]
				if kind == "room" {
					_, err = node.rpc.BroadcastRoom(context.Background(), &pb.BroadcastRoomReq{RoomId: room, Proto: p})
				} else {
					// job names a user push's per-node message "<id>/<node>".
					q := &pb.Proto{Op: p.Op, Body: p.Body, Id: p.Id + "/node1", Positions: p.Positions}
					_, err = node.rpc.PushMsg(context.Background(), &pb.PushMsgReq{Keys: []string{"k"}, Proto: q})
				}
				if err != nil {
					t.Error(err)
				}
			}
			queues := make([]chan *pb.Proto, workers)
			var wg sync.WaitGroup
			for i := range queues {
				queues[i] = make(chan *pb.Proto, 64)
				seed := uint64(i)
				wg.Go(func() {
					r := rand.New(rand.NewPCG(seed, 7))
					var batch []*pb.Proto
					flush := func() {
						if len(batch) > 0 {
							deliver(batch...)
							batch = nil
						}
					}
					for p := range queues[i] {
						if r.IntN(50) == 0 {
							// A slow handler or a retry's wait: the
							// network's delay, injected, not a wait
							// for anything.
							time.Sleep(time.Duration(1+r.IntN(8)) * gap)
						}
						if kind == "room batches" {
							// job gathers a room's messages, up to 20 a
							// call; a retried one goes alone.
							batch = append(batch, p)
							if len(batch) == 20 || r.IntN(5) == 0 {
								flush()
							}
							if r.IntN(40) == 0 {
								deliver(p)
							}
							continue
						}
						deliver(p)
						if r.IntN(40) == 0 {
							deliver(p) // job's retry after a lost reply
						}
					}
					flush()
				})
			}
			go func() {
				r := rand.New(rand.NewPCG(1, 2))
				for i := 1; i <= n; i++ {
					sp := h.appendMsg(stream, strconv.Itoa(i))
					id := fmt.Sprint(stream, "/", sp.Epoch, "/", sp.Pos)
					queues[r.IntN(workers)] <- &pb.Proto{Op: 1000, Body: []byte(strconv.Itoa(i)), Id: id, Positions: []*pb.StreamPos{sp}}
				}
				for _, q := range queues {
					close(q)
				}
			}()
			counts := func() string {
				o := node.st.order
				return fmt.Sprintf("skipped %d, late %d, unordered %d, filled %d, duplicates %d",
					o.skipped.Load(), o.late.Load(), o.unordered.Load(), o.filled.Load(), o.dups.Load())
			}
			var bad []string
			for want := 1; want <= n; {
				p, err := c.Read()
				if err != nil {
					t.Fatalf("read after position %d: %v; %s; first wrong: %v", want-1, err, counts(), bad[:min(len(bad), 10)])
				}
				if p.Op < 1000 {
					continue
				}
				if b := string(p.Body); b != strconv.Itoa(want) {
					bad = append(bad, fmt.Sprintf("#%d: %s", want, b))
				}
				want++
			}
			wg.Wait()
			if len(bad) > 0 {
				t.Fatalf("%d of %d messages not at their position (first: %v); %s", len(bad), n, bad[:min(len(bad), 10)], counts())
			}
			// Nothing more comes before a fence at the next position.
			sp := h.appendMsg(stream, "fence")
			deliver(&pb.Proto{Op: 1000, Body: []byte("fence"), Id: "fence", Positions: []*pb.StreamPos{sp}})
			expectBodies(t, c, "fence")
		})
	}
}

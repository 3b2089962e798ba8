package job

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// With NodesTTL, deliveries read the node list once per TTL, and a key
// push to a node that registered since is delivered: the kept list that
// lacks it is read again. Without it, every delivery reads the list.
func TestNodeListKept(t *testing.T) {
	for _, tc := range []struct {
		name string
		ttl  time.Duration
		// reads after: a push to k1, to k2 on the node added since,
		// to k1 again
		want []int
	}{
		{"kept", time.Minute, []int{1, 2, 2}},
		{"read every delivery", 0, []int{1, 2, 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c1, a1 := startKeyCloud(t, "k1")
			c2, a2 := startKeyCloud(t, "k2")
			reg := &registry{nodes: reportedNodes{{Id: "n1", GrpcAddr: a1}}, keys: map[string]string{"k1": "n1"}, mids: map[string]int64{}}
			p := runJobKeeping(t, reg, time.Second, tc.ttl)
			reads := func() int {
				reg.mu.Lock()
				defer reg.mu.Unlock()
				return reg.lookups
			}
			var got []int
			p.acked(p.push("m1", "n1", "one", "k1"))
			got = append(got, reads())
			reg.addNode(&pb.NodeInfo{Id: "n2", GrpcAddr: a2})
			reg.move("k2", "n2")
			p.acked(p.push("m2", "n2", "two", "k2"))
			got = append(got, reads())
			p.acked(p.push("m3", "n1", "three", "k1"))
			got = append(got, reads())
			if !slices.Equal(got, tc.want) {
				t.Errorf("node list reads %v, want %v", got, tc.want)
			}
			if r := c1.received("k1"); !slices.Equal(r, []string{"one", "three"}) {
				t.Errorf("k1 got %v", r)
			}
			if r := c2.received("k2"); !slices.Equal(r, []string{"two"}) {
				t.Errorf("k2 on the new node got %v", r)
			}
		})
	}
}

// TestBundledRoomPushesShareANodeListRead: a bundle's room pushes, started
// one after another on its goroutine, share one read of a kept node list
// taken after the bundle arrived — each asking for a list as of its own
// start read the registry once a push, in turn.
func TestBundledRoomPushesShareANodeListRead(t *testing.T) {
	cloud, addr := startFakeCloud(t)
	reg := &registry{nodes: reportedNodes{{Id: "n1", GrpcAddr: addr}}, keys: map[string]string{}, mids: map[string]int64{}}
	p := runJobKeeping(t, reg, time.Second, time.Minute)
	const n = 50
	msgs := make([]*message.Message, n)
	for i := range msgs {
		m, err := pipeline.NewPushMessage(fmt.Sprint("r", i), "c", &pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: 1000, Room: "live://r", Msg: []byte("x")})
		if err != nil {
			t.Fatal(err)
		}
		msgs[i] = m
	}
	bundle, err := pipeline.NewBundle(msgs)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.pubsub.Publish("push", bundle); err != nil { // returns once job acked it
		t.Fatal(err)
	}
	reg.mu.Lock()
	reads := reg.lookups
	reg.mu.Unlock()
	if reads > 2 {
		t.Fatalf("%d node list reads for one bundle of %d room pushes, want at most 2", reads, n)
	}
	sum := 0
	for _, c := range cloud.callSizes() {
		sum += c
	}
	if sum != n {
		t.Fatalf("the node got %d room pushes, want %d", sum, n)
	}
}

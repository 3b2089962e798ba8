package logic

import (
	"context"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// countingRegistry counts the node list reads.
type countingRegistry struct {
	pipeline.Registry
	reads atomic.Int32
}

func (r *countingRegistry) Nodes(ctx context.Context) ([]*pb.NodeInfo, error) {
	r.reads.Add(1)
	return r.Registry.Nodes(ctx)
}

// With NodesTTL (a shared registry), pushes read the node list once per
// TTL, yet a key on a node that registered after the list was read is
// not taken for a lapsed node's: the list is read again for it. Without
// it (the memory registry), every push reads the list.
func TestPushNodeListKept(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		ttl  time.Duration
		// reads after: a room push, a second one, a key push to the
		// node registered since
		wantReads []int32
	}{
		{"kept for the TTL", time.Minute, []int32{1, 1, 2}},
		{"read every push", 0, []int32{1, 2, 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mem := memory.New(time.Minute, time.Minute)
			reg := &countingRegistry{Registry: mem}
			if _, err := mem.RenewNode(ctx, &pb.NodeInfo{Id: "n1", RoomCount: map[string]int32{"live://1": 2}}); err != nil {
				t.Fatal(err)
			}
			p := &Pusher{registry: reg, nodes: newNodeLister(reg, tc.ttl), publisher: &recordingPublisher{}, topics: []string{"push"}}
			var reads []int32
			for range 2 {
				res, err := p.PushRoom(ctx, Push{ID: "m", Operation: 1000}, "live://1")
				if err != nil || res.Online != 2 {
					t.Fatalf("room push: online %d, %v", res.Online, err)
				}
				reads = append(reads, reg.reads.Load())
			}
			if _, err := mem.RenewNode(ctx, &pb.NodeInfo{Id: "n2"}); err != nil {
				t.Fatal(err)
			}
			if _, _, err := mem.AddSession(ctx, 7, "k2", "n2", 0); err != nil {
				t.Fatal(err)
			}
			res, err := p.PushKeys(ctx, Push{ID: "m2", Operation: 1000}, []string{"k2"})
			if err != nil || res.Online != 1 || len(res.OfflineKeys) != 0 {
				t.Fatalf("key on the new node: online %d, offline %v, %v", res.Online, res.OfflineKeys, err)
			}
			reads = append(reads, reg.reads.Load())
			if !slices.Equal(reads, tc.wantReads) {
				t.Fatalf("node list reads %v, want %v", reads, tc.wantReads)
			}
		})
	}
}

package job

import (
	"slices"
	"testing"
	"time"

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

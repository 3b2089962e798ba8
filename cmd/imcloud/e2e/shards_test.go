package e2e

import (
	"net/url"
	"slices"
	"strconv"
	"testing"
	"time"

	"imcloud/pipeline"
	"imcloud/proto/client"
	"imcloud/stages/logic/token"
)

// TestShardedStandalone: with topics.push_shards = 4 on the embedded
// broker, job reads every shard: a push to users on all four, a room push
// and a broadcast all arrive.
func TestShardedStandalone(t *testing.T) {
	h := start(t, "topics.push_shards=4")
	var conns []*client.Conn
	var keys []string
	shards := map[int]bool{}
	for mid := int64(1); len(shards) < 4; mid++ {
		shards[pipeline.ShardOf(pipeline.UserStream(mid), 4)] = true
		k := "sharded-" + strconv.FormatInt(mid, 10)
		keys = append(keys, k)
		conns = append(conns, h.connect("ws", token.Claims{Mid: mid, Key: k, Rooms: []string{"live://sharded"}}))
	}
	h.push(request{path: "/im/push/keys", query: url.Values{"operation": {"1000"}, "keys": keys}, body: "to-keys"})
	h.push(request{path: "/im/push/room", query: url.Values{"operation": {"1000"}, "type": {"live"}, "room": {"sharded"}}, body: "to-room"})
	h.push(request{path: "/im/push/all", query: url.Values{"operation": {"1000"}}, body: "to-all"})
	// Three streams (a user's, the room's, none for a broadcast) on
	// their own shards: no order between them is promised.
	for i, c := range conns {
		var got []string
		for range 3 {
			_ = c.SetReadDeadline(time.Now().Add(wait))
			p, err := c.Read()
			if err != nil || p.Op != 1000 {
				t.Fatalf("%s: read op %d, %v after %v", keys[i], p.Op, err, got)
			}
			got = append(got, string(p.Body))
		}
		slices.Sort(got)
		if !slices.Equal(got, []string{"to-all", "to-keys", "to-room"}) {
			t.Fatalf("%s got %v, want each push once", keys[i], got)
		}
	}
}

package logic

import (
	"encoding/json"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/pipeline"
	"imcloud/proto/pb"
)

// topicPublisher records each message with the topic it went to.
type topicPublisher struct {
	mu   sync.Mutex
	sent []sentMsg
	// fail refuses every publish to this topic.
	fail string
}

type sentMsg struct {
	topic string
	msg   *message.Message
}

func (p *topicPublisher) Publish(topic string, msgs ...*message.Message) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if topic == p.fail {
		return fmt.Errorf("%s: %w", topic, pipeline.ErrQueueFull)
	}
	for _, m := range msgs {
		p.sent = append(p.sent, sentMsg{topic, m})
	}
	return nil
}

func (p *topicPublisher) Close() error { return nil }

func (p *topicPublisher) take() []sentMsg {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.sent
	p.sent = nil
	return s
}

// TestPushesKeepToTheirShard: with four push shards, a room's pushes go to
// its room stream's shard, and a push to many users or keys is split so
// that each user's part goes to its user stream's shard (a guest's by its
// key); every recipient once, no message across shards, the shard never
// on the wire.
func TestPushesKeepToTheirShard(t *testing.T) {
	topics := []string{"push.0", "push.1", "push.2", "push.3"}
	pub := &topicPublisher{}
	a := newAPI(t, apiOptions{pub: pub, topics: topics})
	midOf := map[string]int64{}
	var mids []string
	for m := int64(1); m <= 40; m++ {
		k := "k" + strconv.FormatInt(m, 10)
		a.online(m, k)
		midOf[k] = m
		mids = append(mids, strconv.FormatInt(m, 10))
	}
	for _, g := range []string{"guest-a", "guest-b", "guest-c"} {
		a.online(0, g)
		midOf[g] = 0
	}
	shardOfKey := func(k string) int {
		if m := midOf[k]; m != 0 {
			return pipeline.ShardOf(pipeline.UserStream(m), len(topics))
		}
		return pipeline.ShardOf("key:"+k, len(topics))
	}
	// checkSplit: every key once, each message's keys of its topic's shard.
	checkSplit := func(what string, sent []sentMsg, want []string) {
		t.Helper()
		var got []string
		used := map[string]bool{}
		for _, s := range sent {
			if _, ok := s.msg.Metadata["_imcloud_shard"]; ok {
				t.Errorf("%s: the shard reached the broker in %s's metadata", what, s.msg.UUID)
			}
			pm, err := pipeline.DecodePush(s.msg)
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range pm.Keys {
				if want := topics[shardOfKey(k)]; s.topic != want {
					t.Errorf("%s: key %s (mid %d) went to %s, want %s", what, k, midOf[k], s.topic, want)
				}
			}
			got = append(got, pm.Keys...)
			used[s.topic] = true
		}
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("%s: keys %v, want %v", what, got, want)
		}
		if len(used) < 2 {
			t.Errorf("%s: all in %v; 40 users should spread over the shards", what, used)
		}
	}
	allKeys := make([]string, 0, len(midOf))
	for k := range midOf {
		allKeys = append(allKeys, k)
	}

	if r := a.do("POST", "/im/push/mids?operation=1000&mids="+strings.Join(mids, "&mids="), "", "hi", nil); r.status != 200 {
		t.Fatalf("push/mids: %d %s %v", r.status, r.Data, *r.Msg)
	}
	var userKeys []string
	for k, m := range midOf {
		if m != 0 {
			userKeys = append(userKeys, k)
		}
	}
	checkSplit("push/mids", pub.take(), userKeys)

	if r := a.do("POST", "/im/push/keys?operation=1000&keys="+strings.Join(allKeys, "&keys="), "", "hi", nil); r.status != 200 {
		t.Fatalf("push/keys: %d %s", r.status, r.Data)
	}
	sent := pub.take()
	checkSplit("push/keys", sent, allKeys)
	ids := map[string]bool{}
	for _, s := range sent {
		if ids[s.msg.UUID] {
			t.Errorf("push/keys: two messages of id %s", s.msg.UUID)
		}
		ids[s.msg.UUID] = true
	}

	for i := range 20 {
		room := fmt.Sprintf("live://r%d", i)
		want := topics[pipeline.ShardOf(pipeline.RoomStream(room), len(topics))]
		for range 2 {
			if r := a.do("POST", "/im/push/room?operation=1000&type=live&room="+url.QueryEscape(strings.TrimPrefix(room, "live://")), "", "hi", nil); r.status != 200 {
				t.Fatalf("push/room: %d %s", r.status, r.Data)
			}
			sent := pub.take()
			if len(sent) != 1 || sent[0].topic != want {
				t.Fatalf("room %s: sent %d, to %v; want one to %s", room, len(sent), sent, want)
			}
			pm, err := pipeline.DecodePush(sent[0].msg)
			if err != nil || pm.Type != pb.PushMsg_ROOM || pm.Room != room {
				t.Fatalf("room %s: published %v, %v", room, pm, err)
			}
		}
	}

	// A batch: each item to its own shard, in one request.
	body := `[{"operation":1000,"type":"live","room":"b1","msg":"1"},{"operation":1000,"mids":[1,2,3,4,5,6],"msg":"2"},{"operation":1000,"all":true,"msg":"3"}]`
	if r := a.do("POST", "/im/push/batch", "application/json", body, nil); r.status != 200 {
		t.Fatalf("batch: %d %s", r.status, r.Data)
	}
	var rooms, broadcasts int
	var batchKeys []string
	for _, s := range pub.take() {
		pm, err := pipeline.DecodePush(s.msg)
		if err != nil {
			t.Fatal(err)
		}
		switch pm.Type {
		case pb.PushMsg_ROOM:
			rooms++
			if want := topics[pipeline.ShardOf(pipeline.RoomStream(pm.Room), len(topics))]; s.topic != want {
				t.Errorf("batch: room %s went to %s, want %s", pm.Room, s.topic, want)
			}
		case pb.PushMsg_BROADCAST:
			broadcasts++
			if !slices.Contains(topics, s.topic) {
				t.Errorf("batch: broadcast went to %s", s.topic)
			}
		default:
			for _, k := range pm.Keys {
				if want := topics[shardOfKey(k)]; s.topic != want {
					t.Errorf("batch: key %s went to %s, want %s", k, s.topic, want)
				}
			}
			batchKeys = append(batchKeys, pm.Keys...)
		}
	}
	slices.Sort(batchKeys)
	if rooms != 1 || broadcasts != 1 || !slices.Equal(batchKeys, []string{"k1", "k2", "k3", "k4", "k5", "k6"}) {
		t.Fatalf("batch: %d room, %d broadcast, keys %v", rooms, broadcasts, batchKeys)
	}
}

// TestShardOfIsStable: the shard of a stream must not change between
// processes or versions (every logic of a cluster must choose alike), so
// a few are pinned; and the choice spreads.
func TestShardOfIsStable(t *testing.T) {
	for _, tc := range []struct {
		key  string
		n    int
		want int
	}{
		{"room:live://1", 1, 0},
		{"", 4, int(uint32(2166136261) % 4)},
		{"a", 4, int(uint32(0xe40c292c) % 4)},
		{"foobar", 16, int(uint32(0xbf9cf968) % 16)},
	} {
		if got := pipeline.ShardOf(tc.key, tc.n); got != tc.want {
			t.Errorf("ShardOf(%q, %d) = %d, want %d", tc.key, tc.n, got, tc.want)
		}
	}
	counts := make([]int, 8)
	for m := range 8000 {
		counts[pipeline.ShardOf(pipeline.UserStream(int64(m)), 8)]++
	}
	for i, c := range counts {
		if c < 800 || c > 1200 {
			t.Errorf("shard %d of 8 took %d of 8,000 users", i, c)
		}
	}
}

// TestAFullShardFailsOnlyItsPushes: in a batch, a shard the broker refuses
// fails the pushes with a message on it; those on other shards are
// accepted and published.
func TestAFullShardFailsOnlyItsPushes(t *testing.T) {
	topics := []string{"push.0", "push.1", "push.2", "push.3"}
	pub := &topicPublisher{fail: "push.2"}
	a := newAPI(t, apiOptions{pub: pub, topics: topics})
	var items []string
	var onFull []bool
	for i := range 12 {
		room := "r" + strconv.Itoa(i)
		items = append(items, `{"operation":1000,"type":"live","room":"`+room+`","msg":"x"}`)
		onFull = append(onFull, topics[pipeline.ShardOf(pipeline.RoomStream("live://"+room), 4)] == "push.2")
	}
	if !slices.Contains(onFull, true) || !slices.Contains(onFull, false) {
		t.Fatalf("the rooms do not cover the full shard and the others: %v", onFull)
	}
	r := a.do("POST", "/im/push/batch", "application/json", "["+strings.Join(items, ",")+"]", nil)
	var res struct {
		Accepted int `json:"accepted"`
		Results  []struct {
			Index  int `json:"index"`
			Status int `json:"status"`
		} `json:"results"`
	}
	if err := json.Unmarshal(r.Data, &res); err != nil || len(res.Results) != len(items) {
		t.Fatalf("batch: %d %s (%v)", r.status, r.Data, err)
	}
	for i, it := range res.Results {
		if want := map[bool]int{true: 503, false: 200}[onFull[i]]; it.Status != want {
			t.Errorf("item %d (on the full shard: %t): status %d, want %d", i, onFull[i], it.Status, want)
		}
	}
	for _, s := range pub.take() {
		if s.topic == "push.2" {
			t.Errorf("published to the refusing shard")
		}
	}
}

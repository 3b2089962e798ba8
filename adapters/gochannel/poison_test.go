package gochannel

import (
	"context"
	"runtime"
	"slices"
	"testing"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"

	"imcloud/adapters/poisontest"
	"imcloud/pipeline"
)

// TestPoisonContract runs the poison admin contract on the embedded broker.
func TestPoisonContract(t *testing.T) {
	poisontest.Run(t, "imcloud.test.poison.", func(t *testing.T) poisontest.Broker {
		ps := New(watermill.NopLogger{}, 1000, nil)
		t.Cleanup(func() { _ = ps.Close() })
		return poisontest.Broker{
			Publisher: ps, Subscriber: ps, RecordsTime: true,
			Admin: func(t *testing.T, poison string, targets pipeline.ReplayTargets) pipeline.PoisonAdmin {
				ps.Keep(poison, 100, nil)
				a, err := ps.PoisonAdmin(poison, targets)
				if err != nil {
					t.Fatal(err)
				}
				return a
			},
		}
	})
}

// TestPoisonKept: a kept topic is not counted unheard, and an admin
// refuses to replay to a topic nobody would receive, losing nothing.
func TestPoisonKept(t *testing.T) {
	ps := New(watermill.NopLogger{}, 1000, nil)
	defer ps.Close()
	ps.Keep("poison", 2, nil)
	for i := range 2 {
		if err := ps.Publish("poison", message.NewMessage(watermill.NewUUID(), []byte{byte(i)})); err != nil {
			t.Fatal(err)
		}
	}
	if ps.Unheard() != 0 {
		t.Fatalf("kept messages counted unheard: %d", ps.Unheard())
	}
	a, err := ps.PoisonAdmin("poison", pipeline.ReplayTargets{"push"})
	if err != nil {
		t.Fatal(err)
	}
	n, err := a.Replay(context.Background(), pipeline.All)
	if err == nil || n.Total() != 0 {
		t.Fatalf("replay with no subscriber to the target: %v, %v; want 0 and an error", n, err)
	}
	if msgs, _, _ := a.List(context.Background(), "", 1000); len(msgs) != 2 {
		t.Fatalf("refused replay lost messages: %d left", len(msgs))
	}
	if _, err := ps.PoisonAdmin("other", pipeline.ReplayTargets{"push"}); err == nil {
		t.Fatal("admin over a topic not kept: no error")
	}
}

// TestPoisonKeptEvictsOldest: a full kept topic evicts its oldest message
// for each new one and never refuses the publish. Refusing it (as the
// first kept topic did, with ErrQueueFull) failed the poison middleware's
// handler, and the message was redelivered for ever, holding a
// max_pending slot.
func TestPoisonKeptEvictsOldest(t *testing.T) {
	tests := []struct {
		name      string
		limit     int
		batches   [][]string // ids published together
		want      []string   // left, oldest first
		evictions []int      // what each onEvict call said
	}{
		{"within the limit", 3, [][]string{{"a"}, {"b"}, {"c"}}, []string{"a", "b", "c"}, nil},
		{"one past", 3, [][]string{{"a"}, {"b"}, {"c"}, {"d"}}, []string{"b", "c", "d"}, []int{1}},
		{"one at a time", 2, [][]string{{"a"}, {"b"}, {"c"}, {"d"}, {"e"}}, []string{"d", "e"}, []int{1, 1, 1}},
		{"a batch past the limit", 2, [][]string{{"a"}, {"b", "c", "d"}}, []string{"c", "d"}, []int{2}},
		{"limit 0 keeps one", 0, [][]string{{"a"}, {"b"}}, []string{"b"}, []int{1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ps := New(watermill.NopLogger{}, 1000, nil)
			defer ps.Close()
			var (
				evictions []int
				lastTotal int64
			)
			ps.Keep("poison", tt.limit, func(topic string, n int, total int64) {
				if topic != "poison" {
					t.Errorf("eviction reported for %q", topic)
				}
				evictions = append(evictions, n)
				lastTotal = total
			})
			for _, batch := range tt.batches {
				var msgs []*message.Message
				for _, id := range batch {
					msgs = append(msgs, message.NewMessage(id, []byte(id)))
				}
				if err := ps.Publish("poison", msgs...); err != nil {
					t.Fatalf("publish %v to a kept topic: %v; want it taken", batch, err)
				}
			}
			a, err := ps.PoisonAdmin("poison", pipeline.ReplayTargets{"push"})
			if err != nil {
				t.Fatal(err)
			}
			listed, _, err := a.List(context.Background(), "", 1000)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range listed {
				got = append(got, m.ID)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("kept %v, want %v", got, tt.want)
			}
			if !slices.Equal(evictions, tt.evictions) {
				t.Errorf("onEvict told %v, want %v", evictions, tt.evictions)
			}
			var want int64
			for _, n := range tt.evictions {
				want += int64(n)
			}
			if ps.Evicted("poison") != want || lastTotal != want {
				t.Errorf("evicted %d, last total told %d; want %d", ps.Evicted("poison"), lastTotal, want)
			}
			if ps.Pending() != 0 {
				t.Errorf("kept messages hold %d max_pending slots", ps.Pending())
			}
		})
	}
}

// TestPoisonPutBackEvicts: messages a failed replay puts back into a ring
// that filled meanwhile stay within the limit, the oldest going.
func TestPoisonPutBackEvicts(t *testing.T) {
	k := &kept{topic: "poison", max: 2}
	k.add([]*message.Message{message.NewMessage("a", nil), message.NewMessage("b", nil)})
	taken := k.take(func(keptMsg) bool { return true })
	k.add([]*message.Message{message.NewMessage("c", nil), message.NewMessage("d", nil)})
	k.putBack(taken)
	var got []string
	for _, m := range k.msgs {
		got = append(got, m.msg.UUID)
	}
	if want := []string{"c", "d"}; !slices.Equal(got, want) {
		t.Fatalf("after put back: %v, want %v", got, want)
	}
	if k.Evicted() != 2 {
		t.Fatalf("evicted %d, want 2", k.Evicted())
	}
}

// TestKeptMemory measures what a kept poisoned message holds, to size
// broker.gochannel.max_poisoned: a push's metadata as the poison
// middleware leaves it, a 100-byte body. Measured 899 bytes a message
// (go1.26, amd64), body and the ring's slice included; the bound asserted
// leaves room for another Go or Watermill version.
func TestKeptMemory(t *testing.T) {
	const n, body = 5000, 100
	k := &kept{topic: "poison", max: n}
	before := heapInUse()
	for range n {
		m := message.NewMessage(watermill.NewUUID(), make([]byte, body))
		for _, kv := range [][2]string{
			{pipeline.MetaMessageID, watermill.NewUUID()}, {pipeline.MetaPublishedAt, "1764118800000000000"},
			{pipeline.MetaMidKeys, `{"1001":["k-0123456789abcdef"]}`}, {pipeline.MetaOfflineRound, "1"},
			{middleware.ReasonForPoisonedKey, "recipients offline after job.offline_grace"},
			{middleware.PoisonedTopicKey, "imcloud.push"}, {middleware.PoisonedHandlerKey, "job"},
			{middleware.PoisonedSubscriberKey, "*gochannel.PubSub"},
		} {
			m.Metadata.Set(kv[0], kv[1])
		}
		// The original goes once published; the kept copy shares its body.
		k.add([]*message.Message{m})
	}
	after := heapInUse()
	per := float64(after-before) / n
	t.Logf("kept message: %.0f bytes each, %d-byte body included", per, body)
	if per > 2048 {
		t.Fatalf("a kept message holds %.0f bytes; broker.gochannel.max_poisoned's default was sized at about 0.9 KB", per)
	}
	runtime.KeepAlive(k)
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

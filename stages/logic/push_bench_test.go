package logic

import (
	"context"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"

	"imcloud/adapters/memory"
	"imcloud/pipeline"
)

// discardPublisher takes every message and keeps none.
type discardPublisher struct{}

func (discardPublisher) Publish(string, ...*message.Message) error { return nil }
func (discardPublisher) Close() error                              { return nil }

// BenchmarkPushMids is logic's share of a push to one offline user, with
// and without its position in the user's stream (the push API's on/off
// comparison in BENCHMARKS.md, without HTTP).
func BenchmarkPushMids(b *testing.B) {
	for _, on := range []bool{false, true} {
		name := "history=off"
		if on {
			name = "history=on"
		}
		b.Run(name, func(b *testing.B) {
			reg := memory.New(time.Minute, time.Minute)
			p := &Pusher{registry: reg, nodes: newNodeLister(reg, 0), publisher: discardPublisher{}, topics: []string{"push"}}
			if on {
				p.history = memory.NewHistory(pipeline.HistoryCaps{})
				p.limit = func(string) pipeline.StreamLimit { return pipeline.StreamLimit{Size: 1000, TTL: time.Hour} }
			}
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := p.PushMids(ctx, Push{ID: "m", Operation: 1000, Msg: []byte("hello")}, []int64{1}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

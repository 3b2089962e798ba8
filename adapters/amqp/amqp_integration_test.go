//go:build integration

package amqp

import (
	"fmt"
	"imcloud/pipeline"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	"github.com/ThreeDotsLabs/watermill/message"
	"imcloud/adapters/amqp/amqptest"
)

func testURL() string {
	if u := os.Getenv("IMCLOUD_TEST_AMQP_URL"); u != "" {
		return u
	}
	return "amqp://guest:guest@127.0.0.1:5672/"
}

// tempQueue names a queue for one test and deletes it afterwards.
func tempQueue(tb testing.TB) string {
	tb.Helper()
	q := fmt.Sprintf("imcloud.test.%s.%d", strings.ReplaceAll(tb.Name(), "/", "."), time.Now().UnixNano())
	amqptest.DeleteAtEnd(tb, testURL(), q)
	return q
}

// BenchmarkPublishConfirmed measures confirmed publishes per second with
// concurrent publishers, the way logic's HTTP handlers publish: each
// message alone, and bundled as logic's push publisher does
// (pipeline.Bundler).
func BenchmarkPublishConfirmed(b *testing.B) {
	for _, bundle := range []bool{false, true} {
		b.Run(fmt.Sprintf("bundle=%v", bundle), func(b *testing.B) { publishConfirmed(b, bundle) })
	}
}

func publishConfirmed(b *testing.B, bundle bool) {
	q := tempQueue(b)
	amqpPub, err := NewPublisher(testURL(), watermill.NopLogger{}, 4, q)
	if err != nil {
		b.Fatal(err)
	}
	defer amqpPub.Close()
	var pub message.Publisher = amqpPub
	if bundle {
		pub = pipeline.NewBundler(amqpPub)
	}
	payload := make([]byte, 128)
	b.SetParallelism(64)
	start := time.Now()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if err := pub.Publish(q, message.NewMessage(watermill.NewUUID(), payload)); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "confirmed/s")
}

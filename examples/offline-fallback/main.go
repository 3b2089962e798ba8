// Command offline-fallback turns imcloud's "offline" events into a
// fallback call: for each mid push accepted while none of the user's
// connections was online, it POSTs the event to a URL — a stand-in for a
// mobile push service (APNs, FCM, or your own gateway in front of them).
//
// Turn events on in imcloud (events.enabled = true, with "offline" among
// events.kinds), then:
//
//	go run ./examples/offline-fallback -amqp amqp://guest:guest@127.0.0.1:5672/ -url http://127.0.0.1:8080/notify
//
// Each call is a JSON body {"mid":…,"msg_id":…,"op":…,"at":…} with an
// Idempotency-Key header "<msg_id>/<mid>", so a service that dedupes by it
// sends one notification even when an event is redelivered. A 5xx or a
// network error is retried with backoff; a 4xx is logged and dropped (the
// request will not get better); after the last retry the event is nacked
// and the broker redelivers it.
package main

import (
	"context"
	"flag"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"time"

	"github.com/ThreeDotsLabs/watermill"

	"imcloud/adapters/amqp"
)

func main() {
	url := flag.String("amqp", "amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ URL (broker.amqp.url)")
	topic := flag.String("topic", "imcloud.events", "events topic (topics.events)")
	maxLength := flag.Int64("max-length", 1_000_000, "the queue's length limit (topics.events_max_length): declared as imcloud declares it")
	target := flag.String("url", "http://127.0.0.1:8080/notify", "where each offline event is POSTed")
	retries := flag.Int("retries", 4, "retries of a failed call before the event is nacked")
	backoff := flag.Duration("backoff", 200*time.Millisecond, "first wait between retries; doubles each retry")
	flag.Parse()

	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	sub, err := amqp.NewBoundedSubscriber(*url, watermill.NopLogger{}, 16, amqp.Limits{*topic: *maxLength})
	if err != nil {
		logger.Error("connect to the broker", "err", err)
		os.Exit(1)
	}
	defer sub.Close()
	f := &Fallback{URL: *target, Client: &http.Client{Timeout: 5 * time.Second}, Retries: *retries, Backoff: *backoff, Logger: logger}
	msgs, err := sub.Subscribe(ctx, *topic)
	if err != nil {
		logger.Error("subscribe to the events topic", "topic", *topic, "err", err)
		os.Exit(1)
	}
	Run(ctx, msgs, f)
}

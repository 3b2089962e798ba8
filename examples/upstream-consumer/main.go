// Command upstream-consumer shows how a business service reads what clients
// send (op 4): every cloud node publishes each message once to the upstream
// topic, a durable RabbitMQ queue that any number of consumers share.
//
//	go run ./examples/upstream-consumer -amqp amqp://guest:guest@127.0.0.1:5672/
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"

	"github.com/ThreeDotsLabs/watermill"

	"imcloud/adapters/amqp"
	"imcloud/pipeline"
)

func main() {
	url := flag.String("amqp", "amqp://guest:guest@127.0.0.1:5672/", "RabbitMQ URL (broker.amqp.url)")
	topic := flag.String("topic", "imcloud.upstream", "upstream topic (topics.upstream)")
	maxLength := flag.Int64("max-length", 100_000, "the queue's length limit (topics.upstream_max_length): declared as imcloud declares it")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	sub, err := amqp.NewBoundedSubscriber(*url, watermill.NopLogger{}, 16, amqp.Limits{*topic: *maxLength})
	if err != nil {
		log.Fatal(err)
	}
	defer sub.Close()
	msgs, err := sub.Subscribe(ctx, *topic)
	if err != nil {
		log.Fatal(err)
	}
	for m := range msgs {
		// Who sent it and from where; the payload is the op 4 body.
		fmt.Printf("mid=%s key=%s rooms=%s seq=%s: %s\n",
			m.Metadata.Get(pipeline.MetaMid), m.Metadata.Get(pipeline.MetaKey),
			m.Metadata.Get(pipeline.MetaRooms), m.Metadata.Get(pipeline.MetaSeq), m.Payload)
		// Ack once handled; an unacked message goes to another consumer.
		m.Ack()
	}
}

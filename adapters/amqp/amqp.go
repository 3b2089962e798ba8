// Package amqp is the RabbitMQ broker: a durable work queue per topic shared
// by every consumer, persistent messages, and pipelined publisher confirms.
//
// Publisher and Subscriber are ours, not watermill-amqp/v3's:
//
//   - watermill-amqp's ConnectionWrapper reassigns its connected channel in
//     handleConnectionClose without the lock its other writer takes, while
//     IsConnected selects on it (watermill issue #693, open, filed against
//     v3.1.0): any broker blip fails -race. We hit it in the RabbitMQ
//     restart test (commit 114279f).
//   - Its publisher waits out one confirm round trip per message per
//     channel: 5.5k confirmed/s here with 32 channels and 64 publishers.
//     Ours keeps many confirms in flight (9.5k/s on version 2 queues, then
//     bound by RabbitMQ's queue process). Gathering concurrent pushes into
//     one confirmed message, first done here (45.9k/s in
//     BenchmarkPublishConfirmed where it was 9.5k/s; commits 603a5f4,
//     d55d46d, 6b03824), is now the pipeline's, for every broker
//     (pipeline.Bundler); the subscriber still reads the batches this
//     publisher used to write.
//
// The subscriber's waits for acks, nack delay and drain on close are
// adapters/internal/settle's, shared with the NATS adapter.
package amqp

import (
	"errors"
	"fmt"

	"github.com/ThreeDotsLabs/watermill"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/pipeline"
)

// ErrQueueFull is returned for a message a queue refused for being at its
// length limit (x-max-length with x-overflow reject-publish).
var ErrQueueFull = fmt.Errorf("rabbitmq queue full: %w", pipeline.ErrQueueFull)

// Limits maps a queue to the most ready messages it holds; a queue not
// listed is unbounded. At the limit the queue refuses new messages
// (reject-publish: the publisher gets a nack) rather than dropping its
// oldest, which would lose them without a word.
type Limits map[string]int64

// args are the arguments queue is declared with; every declaration must
// agree or RabbitMQ refuses the later ones (PRECONDITION_FAILED).
// Version 2 classic queues write persistent messages with markedly less
// CPU: one queue is one Erlang process, and it bounds confirmed publishes.
func (l Limits) args(queue string) amqp091.Table {
	t := amqp091.Table{"x-queue-version": 2}
	if n := l[queue]; n > 0 {
		t["x-max-length"] = n
		t["x-overflow"] = "reject-publish"
	}
	return t
}

// declareQueue declares queue, durable, with the limits' arguments. A
// queue that exists with other arguments (declared before these limits,
// or by a consumer that does not know them) cannot be redeclared:
// RabbitMQ answers PRECONDITION_FAILED. It is then used as it is, and the
// operator is told how to apply the limits, rather than the process
// refusing to start over a queue that holds messages.
func declareQueue(conn *amqp091.Connection, queue string, limits Limits, logger watermill.LoggerAdapter) error {
	ch, err := conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel to declare queue %s: %w", queue, err)
	}
	args := limits.args(queue)
	_, err = ch.QueueDeclare(queue, true, false, false, false, args)
	_ = ch.Close()
	var ae *amqp091.Error
	if !errors.As(err, &ae) || ae.Code != amqp091.PreconditionFailed {
		if err != nil {
			return fmt.Errorf("declare queue %s: %w", queue, err)
		}
		return nil
	}
	// The failed declaration closed that channel.
	ch, err = conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel to inspect queue %s: %w", queue, err)
	}
	defer ch.Close()
	if _, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare queue %s: %w", queue, err)
	}
	logger.Error("rabbitmq queue exists with other arguments; using it as it is, without the configured limits",
		errors.New(ae.Reason), watermill.LogFields{
			"queue": queue, "wanted_args": fmt.Sprint(args),
			"fix": "let it drain, then delete it (rabbitmqctl delete_queue " + queue + ") and restart: it is declared again with the limits",
		})
	return nil
}

// declareQueues declares each queue as declareQueue does.
func declareQueues(conn *amqp091.Connection, queues []string, limits Limits, logger watermill.LoggerAdapter) error {
	for _, q := range queues {
		if err := declareQueue(conn, q, limits, logger); err != nil {
			return err
		}
	}
	return nil
}

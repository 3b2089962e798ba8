package amqp

import (
	"fmt"

	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"

	"imcloud/pipeline"
)

// batchContentType marks an AMQP message that carries several messages,
// as this adapter's publisher wrote them before bundling moved into the
// pipeline (pipeline.Bundler, which any broker carries as one message
// with pipeline.MetaBundle set). The subscriber still reads them, so that
// a queue an older version filled is consumed after an upgrade.
const batchContentType = "application/vnd.imcloud.batch+protobuf"

// unbatch returns the messages a delivery carries: those of a batch, or
// the delivery itself.
func unbatch(d amqp091.Delivery) ([]*message.Message, error) {
	if d.ContentType != batchContentType {
		msg, err := marshaler{}.Unmarshal(d)
		if err != nil {
			return nil, err
		}
		return []*message.Message{msg}, nil
	}
	msgs, err := pipeline.DecodeBundle(d.Body)
	if err != nil {
		return nil, fmt.Errorf("decode batch: %w", err)
	}
	return msgs, nil
}

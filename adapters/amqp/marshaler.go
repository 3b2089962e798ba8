package amqp

import (
	"encoding/json"
	"fmt"

	wamqp "github.com/ThreeDotsLabs/watermill-amqp/v3/pkg/amqp"
	"github.com/ThreeDotsLabs/watermill/message"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// marshaler is watermill-amqp's default marshaler, except that it accepts
// headers that are not strings. RabbitMQ adds some itself (x-death is a
// list of tables); the default marshaler fails on them before the router
// sees the message, and the message is requeued and fails again forever.
type marshaler struct {
	wamqp.DefaultMarshaler
}

// Unmarshal renders non-string header values as JSON.
func (m marshaler) Unmarshal(d amqp091.Delivery) (*message.Message, error) {
	headers := make(amqp091.Table, len(d.Headers))
	for k, v := range d.Headers {
		if s, ok := v.(string); ok {
			headers[k] = s
			continue
		}
		b, err := json.Marshal(v)
		if err != nil {
			b = fmt.Appendf(nil, "%v", v)
		}
		headers[k] = string(b)
	}
	d.Headers = headers
	return m.DefaultMarshaler.Unmarshal(d)
}

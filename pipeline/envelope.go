// Package pipeline is the Watermill glue the stages share: broker
// construction from config, the router with its middleware stack, and the
// message envelope that carries a PushMsg.
package pipeline

import (
	"fmt"
	"strconv"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"google.golang.org/protobuf/proto"

	"imcloud/proto/pb"
)

// Metadata keys every message carries.
const (
	// MetaMessageID is the message id, also the deduplication key.
	MetaMessageID = "message_id"
	// MetaPublishedAt is the publish time in Unix nanoseconds, for latency.
	MetaPublishedAt = "published_at"
	// MetaMid, MetaKey and MetaSeq describe the sender of an upstream message.
	MetaMid = "mid"
	MetaKey = "key"
	MetaSeq = "seq"
	// MetaRooms is the comma-separated rooms of an upstream sender.
	MetaRooms = "rooms"
	// MetaDeliveredNodes lists the cloud nodes a room or broadcast push
	// already reached, so that retries and replays skip them.
	MetaDeliveredNodes = "delivered_nodes"
	// MetaOfflineRound counts the attempts of a key push that found
	// recipients offline. Each round calls cloud under a fresh id, since a
	// node remembers an id it saw even for the keys it did not have.
	MetaOfflineRound = "offline_round"
)

// NewPushMessage wraps pm into a message with id and correlation id set.
func NewPushMessage(id, correlationID string, pm *pb.PushMsg) (*message.Message, error) {
	payload, err := proto.Marshal(pm)
	if err != nil {
		return nil, fmt.Errorf("marshal push message: %w", err)
	}
	msg := message.NewMessage(id, payload)
	msg.Metadata.Set(MetaMessageID, id)
	msg.Metadata.Set(MetaPublishedAt, strconv.FormatInt(time.Now().UnixNano(), 10))
	middleware.SetCorrelationID(correlationID, msg)
	return msg, nil
}

// DecodePush unwraps the PushMsg a message carries.
func DecodePush(msg *message.Message) (*pb.PushMsg, error) {
	var pm pb.PushMsg
	if err := proto.Unmarshal(msg.Payload, &pm); err != nil {
		return nil, fmt.Errorf("decode push message %s: %w", msg.UUID, err)
	}
	return &pm, nil
}

// Package pipeline is imcloud's queue-agnostic framework: the Watermill
// router with its middleware stack (retry, poison queue, deduplication),
// the message envelope and its metadata vocabulary, the Broker a stage
// publishes and subscribes through, and the interfaces the stages need —
// DedupeStore, Registry, PoisonAdmin and the idempotency store. It knows no queue: adapters/ implements the
// interfaces, and the adapters package opens the ones a configuration
// names, so a new broker touches adapters/ and one line of wiring.
package pipeline

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
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
	// recipients offline: after the first, job looks up again where each
	// key is connected (it may have reconnected on another node), and a
	// replayed message does so at once.
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

// MetaMidKeys maps, as JSON, each user a mid push was for to every key
// the user had when logic accepted the push. A key that is gone at
// delivery stands for its user: job delivers to the user's keys that are
// not in this list, the connections made since (a client without a key
// claim gets a new key each time it connects).
const MetaMidKeys = "mid_keys"

// SetMidKeys records in msg, for the users whose keys are among keys,
// all their keys in byMid (every user of a mid push, with their keys as
// the registry listed them).
func SetMidKeys(msg *message.Message, keys []string, byMid map[int64]map[string]string) {
	if len(byMid) == 0 {
		return
	}
	in := make(map[string]bool, len(keys))
	for _, k := range keys {
		in[k] = true
	}
	out := map[string][]string{}
	for mid, ks := range byMid {
		for k := range ks {
			if in[k] {
				out[strconv.FormatInt(mid, 10)] = slices.Sorted(maps.Keys(ks))
				break
			}
		}
	}
	if len(out) == 0 {
		return
	}
	b, err := json.Marshal(out)
	if err != nil {
		return // a map of strings always marshals
	}
	msg.Metadata.Set(MetaMidKeys, string(b))
}

// MidKeys returns what SetMidKeys recorded: each user's keys at accept.
func MidKeys(msg *message.Message) (map[int64][]string, error) {
	raw := msg.Metadata.Get(MetaMidKeys)
	if raw == "" {
		return nil, nil
	}
	var m map[string][]string
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		return nil, fmt.Errorf("decode %s of %s: %w", MetaMidKeys, msg.UUID, err)
	}
	out := make(map[int64][]string, len(m))
	for s, keys := range m {
		mid, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("decode %s of %s: mid %q: %w", MetaMidKeys, msg.UUID, s, err)
		}
		out[mid] = keys
	}
	return out, nil
}

// CanaryRoom is the room of job's canaries (job.canary_interval): not a
// room a client can name (it has no "://"), so no client ever joins it.
const CanaryRoom = "imcloud:canary"

// NewCanaryMessage is a canary push: a room push to CanaryRoom that job
// sends to every cloud node, which records its arrival (its readiness
// and imcloud_canary_* metrics) and delivers it to no one.
func NewCanaryMessage(source string) (*message.Message, error) {
	id := fmt.Sprintf("canary/%s/%d", source, time.Now().UnixNano())
	return NewPushMessage(id, id, &pb.PushMsg{Type: pb.PushMsg_ROOM, Room: CanaryRoom, Operation: 1000})
}

// IsCanary reports whether pm is a canary.
func IsCanary(pm *pb.PushMsg) bool { return pm.Type == pb.PushMsg_ROOM && pm.Room == CanaryRoom }

package logic

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"imcloud/pipeline"
	"imcloud/pipeline/events"
	"imcloud/proto/pb"
)

// idempotencyNamespace derives message ids from Idempotency-Key headers.
var idempotencyNamespace = uuid.MustParse("6f1d2c1e-8a51-4a57-9f3c-5b0c2f0e7a11")

// ErrBroker marks a failure to hand a message to the broker: the caller may
// retry, nothing was accepted.
var ErrBroker = errors.New("broker unavailable")

// ErrRegistry marks a failure to read the session registry: the caller
// may retry, nothing was published.
var ErrRegistry = errors.New("registry unavailable")

// Pusher resolves push targets and publishes one PushMsg per cloud node.
type Pusher struct {
	registry  pipeline.Registry
	publisher message.Publisher
	topic     string
	events    *events.Emitter // offline events; nil: off
}

// Push is one push request as the HTTP API received it.
type Push struct {
	// ID is the message id; derived from the Idempotency-Key when given.
	ID            string
	CorrelationID string
	Operation     int32
	Msg           []byte
}

// PushResult is what logic knew when it published.
type PushResult struct {
	MsgID       string   `json:"msg_id"`
	Online      int      `json:"online"`
	OfflineKeys []string `json:"offline_keys,omitempty"`
	OfflineMids []int64  `json:"offline_mids,omitempty"`
}

// MessageID returns the id of a push: random, or derived from the
// idempotency key and the request's fingerprint, so that a retried request
// yields the same id (and job's dedupe drops what an interrupted first
// attempt already published) while a retry with other content, allowed
// once a failed attempt released the key, gets another id: job would
// otherwise drop the new content as a duplicate of the old.
func MessageID(idempotencyKey, route, fingerprint string) string {
	if idempotencyKey == "" {
		return uuid.NewString()
	}
	return uuid.NewSHA1(idempotencyNamespace, []byte(route+"\x00"+idempotencyKey+"\x00"+fingerprint)).String()
}

// PushKeys pushes to connections by key.
func (p *Pusher) PushKeys(ctx context.Context, push Push, keys []string) (PushResult, error) {
	servers, err := p.registry.ServersByKeys(ctx, keys)
	if err != nil {
		return PushResult{}, fmt.Errorf("%w: resolve keys: %w", ErrRegistry, err)
	}
	if err := p.dropLapsed(ctx, servers); err != nil {
		return PushResult{}, err
	}
	res := PushResult{MsgID: push.ID, Online: len(servers)}
	for _, k := range keys {
		if _, ok := servers[k]; !ok {
			res.OfflineKeys = append(res.OfflineKeys, k)
		}
	}
	return res, p.publishToServers(ctx, push, servers, nil)
}

// dropLapsed removes the keys whose cloud node is no longer registered: a
// node that stopped reporting (killed, partitioned) holds no connections,
// though its sessions have not expired yet.
func (p *Pusher) dropLapsed(ctx context.Context, servers map[string]string) error {
	if len(servers) == 0 {
		return nil
	}
	nodes, err := p.registry.Nodes(ctx)
	if err != nil {
		return fmt.Errorf("%w: list cloud nodes: %w", ErrRegistry, err)
	}
	live := make(map[string]bool, len(nodes))
	for _, n := range nodes {
		live[n.Id] = true
	}
	for k, s := range servers {
		if !live[s] {
			delete(servers, k)
		}
	}
	return nil
}

// PushMids pushes to every connection of the users.
func (p *Pusher) PushMids(ctx context.Context, push Push, mids []int64) (PushResult, error) {
	byMid, err := p.registry.KeysByMids(ctx, mids)
	if err != nil {
		return PushResult{}, fmt.Errorf("%w: resolve mids: %w", ErrRegistry, err)
	}
	servers := map[string]string{}
	for _, keys := range byMid {
		maps.Copy(servers, keys)
	}
	if err := p.dropLapsed(ctx, servers); err != nil {
		return PushResult{}, err
	}
	res := PushResult{MsgID: push.ID, Online: len(servers)}
	for _, m := range mids {
		online := false
		for k := range byMid[m] {
			_, online = servers[k]
			if online {
				break
			}
		}
		if !online {
			res.OfflineMids = append(res.OfflineMids, m)
		}
	}
	if err := p.publishToServers(ctx, push, servers, byMid); err != nil {
		return res, err
	}
	p.emitOffline(push, res.OfflineMids)
	return res, nil
}

// PushRoom pushes to every connection in room, on every node.
func (p *Pusher) PushRoom(ctx context.Context, push Push, room string) (PushResult, error) {
	pm := &pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: push.Operation, Room: room, Msg: push.Msg}
	return p.publishCounted(ctx, push, pm, room)
}

// PushAll broadcasts to every connection, paced at speed messages/s per node.
func (p *Pusher) PushAll(ctx context.Context, push Push, speed int32) (PushResult, error) {
	pm := &pb.PushMsg{Type: pb.PushMsg_BROADCAST, Operation: push.Operation, Speed: speed, Msg: push.Msg}
	return p.publishCounted(ctx, push, pm, "")
}

// publishCounted publishes a room or broadcast push; its online count is
// the one the cloud nodes last reported.
func (p *Pusher) publishCounted(ctx context.Context, push Push, pm *pb.PushMsg, room string) (PushResult, error) {
	nodes, err := p.registry.Nodes(ctx)
	if err != nil {
		return PushResult{}, fmt.Errorf("%w: count online: %w", ErrRegistry, err)
	}
	online := 0
	for _, n := range nodes {
		if room == "" {
			online += int(n.ConnCount)
		} else {
			online += int(n.RoomCount[room])
		}
	}
	return PushResult{MsgID: push.ID, Online: online}, p.publish(ctx, push, pm)
}

// publishToServers publishes one PUSH message per server holding keys.
// Per-server ids extend the push id in a fixed order so that a retried
// idempotent request reproduces them. byMid, for a mid push, lets job
// find a user's new connections if the ones resolved here are gone.
func (p *Pusher) publishToServers(ctx context.Context, push Push, keyServer map[string]string, byMid map[int64]map[string]string) error {
	byServer := map[string][]string{}
	for k, s := range keyServer {
		byServer[s] = append(byServer[s], k)
	}
	msgs := make([]*message.Message, 0, len(byServer))
	for _, server := range slices.Sorted(maps.Keys(byServer)) {
		keys := byServer[server]
		slices.Sort(keys)
		pm := &pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: push.Operation, Server: server, Keys: keys, Msg: push.Msg}
		msg, err := pipeline.NewPushMessage(push.ID+"/"+server, push.CorrelationID, pm)
		if err != nil {
			return err
		}
		pipeline.SetMidKeys(msg, keys, byMid)
		msgs = append(msgs, msg)
	}
	return p.send(ctx, msgs...)
}

func (p *Pusher) publish(ctx context.Context, push Push, pm *pb.PushMsg) error {
	msg, err := pipeline.NewPushMessage(push.ID, push.CorrelationID, pm)
	if err != nil {
		return err
	}
	return p.send(ctx, msg)
}

func (p *Pusher) send(ctx context.Context, msgs ...*message.Message) error {
	if len(msgs) == 0 {
		return nil
	}
	for _, m := range msgs {
		m.SetContext(ctx)
	}
	if err := p.publisher.Publish(p.topic, msgs...); err != nil {
		return fmt.Errorf("%w: publish to %s: %w", ErrBroker, p.topic, err)
	}
	return nil
}

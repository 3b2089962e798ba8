package logic

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"imcloud/pipeline/metrics"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/google/uuid"

	"imcloud/pipeline"
	"imcloud/pipeline/events"
	"imcloud/proto/pb"
	"imcloud/stages/internal/nodecache"
)

// idempotencyNamespace derives message ids from Idempotency-Key headers.
var idempotencyNamespace = uuid.MustParse("6f1d2c1e-8a51-4a57-9f3c-5b0c2f0e7a11")

// ErrBroker marks a failure to hand a message to the broker: the caller may
// retry, nothing was accepted.
var ErrBroker = errors.New("broker unavailable")

// ErrRegistry marks a failure to read the session registry: the caller
// may retry, nothing was published.
var ErrRegistry = errors.New("registry unavailable")

// ErrHistory marks a failure to give a push its stream positions: the
// caller may retry, nothing was published.
var ErrHistory = errors.New("history unavailable")

// maxAppendStreams bounds the streams of one History.Append: a push to
// thousands of users takes its positions in several calls, each one
// short (on Redis one script, during which Redis serves no one else).
// Each stream is in one call only, so each still gets its position in
// one atomic step.
const maxAppendStreams = 100

// voidTimeout bounds the Void of a push's positions after its publish
// failed. It runs on a context of its own (the request's may be what
// ended): a store that does not answer in time leaves the positions
// holding a message that was refused, which is logged. One Redis script
// of 100 streams takes well under 10 ms; 2 s is an outage, not a slow call.
const voidTimeout = 2 * time.Second

// Pusher resolves push targets, gives the push its positions in its
// streams and publishes one PushMsg per cloud node.
type Pusher struct {
	registry pipeline.Registry
	metrics  *metrics.Logic // publish latency; nil records nothing
	// nodes lists the live cloud nodes for each push: the registry, or
	// with a shared registry a copy of its list kept briefly
	// (Options.NodesTTL).
	nodes     nodeLister
	publisher message.Publisher
	// topics are the push topic's shards; a message goes to the one
	// pipeline.SetShard named (ShardOf its room's or user's stream).
	topics []string
	events *events.Emitter // offline events; nil: off
	// history gives positions; nil gives none (pushes go out as before
	// streams had positions).
	history pipeline.History
	limit   func(stream string) pipeline.StreamLimit
	// voidFail logs a failed Void, at most once a second; nil: not
	// logged (tests).
	voidFail *pipeline.RateLog
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
	// Positions are the push's place in each stream it went to: the
	// room's, or each user's; none for a broadcast or without history.
	Positions []Position `json:"positions,omitempty"`
}

// Position is a message's place in one stream, as the API shows it.
type Position struct {
	Stream string `json:"stream"`
	Epoch  string `json:"epoch"`
	Pos    uint64 `json:"pos"`
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

// plan is a push resolved to its recipients. A push goes in three steps:
// resolve (read the registry), position (append to its streams' history),
// publish; a batch takes each step for all its pushes before the next, so
// that its publishes go to the broker in one call.
type plan struct {
	push Push
	res  PushResult
	// streams take a position for the push, sorted; keysOf (nil: none)
	// gives the keys the history entry of a chunk of them is for.
	streams []string
	keysOf  func(streams []string) []string
	// pos are the push's positions once it has them, one per stream.
	pos []*pb.StreamPos
	// messages renders what is published from pos, and sets
	// res.Positions.
	messages func() ([]*message.Message, error)
	// offlineMids are evented once the push is accepted.
	offlineMids []int64
}

// PushKeys pushes to connections by key.
func (p *Pusher) PushKeys(ctx context.Context, push Push, keys []string) (PushResult, error) {
	pl, err := p.resolveKeys(ctx, push, keys)
	if err != nil {
		return PushResult{}, err
	}
	return p.run(ctx, pl)
}

// PushMids pushes to every connection of the users.
func (p *Pusher) PushMids(ctx context.Context, push Push, mids []int64) (PushResult, error) {
	pl, err := p.resolveMids(ctx, push, mids)
	if err != nil {
		return PushResult{}, err
	}
	return p.run(ctx, pl)
}

// PushRoom pushes to every connection in room, on every node.
func (p *Pusher) PushRoom(ctx context.Context, push Push, room string) (PushResult, error) {
	pl, err := p.resolveRoom(ctx, push, room)
	if err != nil {
		return PushResult{}, err
	}
	return p.run(ctx, pl)
}

// PushAll broadcasts to every connection, paced at speed messages/s per node.
func (p *Pusher) PushAll(ctx context.Context, push Push, speed int32) (PushResult, error) {
	pl, err := p.resolveAll(ctx, push, speed)
	if err != nil {
		return PushResult{}, err
	}
	return p.run(ctx, pl)
}

// resolveKeys resolves a push to connections by key.
func (p *Pusher) resolveKeys(ctx context.Context, push Push, keys []string) (*plan, error) {
	sessions, err := p.registry.SessionsByKeys(ctx, keys)
	if err != nil {
		return nil, fmt.Errorf("%w: resolve keys: %w", ErrRegistry, err)
	}
	servers := make(map[string]string, len(sessions))
	for k, s := range sessions {
		servers[k] = s.Server
	}
	if err := p.dropLapsed(ctx, servers); err != nil {
		return nil, err
	}
	pl := &plan{push: push, res: PushResult{MsgID: push.ID, Online: len(servers)}}
	for _, k := range keys {
		if _, ok := servers[k]; !ok {
			pl.res.OfflineKeys = append(pl.res.OfflineKeys, k)
		}
	}
	// The user stream of each online key's user: an offline key's push
	// is not sent, so it takes no place in its user's stream.
	// Each entry keeps the keys it was for, so that a node filling a gap
	// or recovering a client gives it to those connections only.
	midOf := make(map[string]int64, len(servers))
	keysOf := map[int64][]string{}
	var mids []int64
	for k := range servers {
		m := sessions[k].Mid
		midOf[k] = m
		mids = append(mids, m)
		keysOf[m] = append(keysOf[m], k)
	}
	pl.streams = p.userStreams(mids)
	pl.keysOf = func(streams []string) []string { return streamKeys(streams, keysOf) }
	pl.messages = func() ([]*message.Message, error) {
		pos := byMid(pl.pos)
		pl.res.Positions = positions(pos)
		return serverMessages(push, servers, nil, userPositions(midOf, pos), p.keyShard(midOf))
	}
	return pl, nil
}

// dropLapsed removes the keys whose cloud node is no longer registered: a
// node that stopped reporting (killed, partitioned) holds no connections,
// though its sessions have not expired yet.
func (p *Pusher) dropLapsed(ctx context.Context, servers map[string]string) error {
	if len(servers) == 0 {
		return nil
	}
	ids := make([]string, 0, 1)
	for _, s := range servers {
		if !slices.Contains(ids, s) {
			ids = append(ids, s)
		}
	}
	nodes, err := p.nodes.NodesWith(ctx, ids)
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

// resolveMids resolves a push to every connection of the users.
func (p *Pusher) resolveMids(ctx context.Context, push Push, mids []int64) (*plan, error) {
	byMidKeys, err := p.registry.KeysByMids(ctx, mids)
	if err != nil {
		return nil, fmt.Errorf("%w: resolve mids: %w", ErrRegistry, err)
	}
	servers := map[string]string{}
	for _, keys := range byMidKeys {
		maps.Copy(servers, keys)
	}
	if err := p.dropLapsed(ctx, servers); err != nil {
		return nil, err
	}
	pl := &plan{push: push, res: PushResult{MsgID: push.ID, Online: len(servers)}}
	for _, m := range mids {
		online := false
		for k := range byMidKeys[m] {
			_, online = servers[k]
			if online {
				break
			}
		}
		if !online {
			pl.res.OfflineMids = append(pl.res.OfflineMids, m)
		}
	}
	pl.offlineMids = pl.res.OfflineMids
	// Every user's stream, online or not: what an offline user missed
	// is history for its next connection.
	pl.streams = p.userStreams(mids)
	pl.messages = func() ([]*message.Message, error) {
		pos := byMid(pl.pos)
		pl.res.Positions = positions(pos)
		midOf := map[string]int64{}
		for m, keys := range byMidKeys {
			for k := range keys {
				midOf[k] = m
			}
		}
		return serverMessages(push, servers, byMidKeys, userPositions(midOf, pos), p.keyShard(midOf))
	}
	return pl, nil
}

// resolveRoom resolves a push to every connection in room, on every
// node: it counts those online, and takes a place in the room's stream.
func (p *Pusher) resolveRoom(ctx context.Context, push Push, room string) (*plan, error) {
	pm := &pb.PushMsg{Type: pb.PushMsg_ROOM, Operation: push.Operation, Room: room, Msg: push.Msg}
	return p.resolveCounted(ctx, push, pm, room)
}

// resolveAll resolves a broadcast, paced at speed messages/s per node.
func (p *Pusher) resolveAll(ctx context.Context, push Push, speed int32) (*plan, error) {
	pm := &pb.PushMsg{Type: pb.PushMsg_BROADCAST, Operation: push.Operation, Speed: speed, Msg: push.Msg}
	return p.resolveCounted(ctx, push, pm, "")
}

// resolveCounted resolves a room or broadcast push; its online count is
// the one the cloud nodes last reported.
func (p *Pusher) resolveCounted(ctx context.Context, push Push, pm *pb.PushMsg, room string) (*plan, error) {
	nodes, err := p.nodes.Nodes(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: count online: %w", ErrRegistry, err)
	}
	online := 0
	for _, n := range nodes {
		if room == "" {
			online += int(n.ConnCount)
		} else {
			online += int(n.RoomCount[room])
		}
	}
	pl := &plan{push: push, res: PushResult{MsgID: push.ID, Online: online}}
	if pm.Type == pb.PushMsg_ROOM && p.history != nil {
		// A room push takes its place in the room's stream; a
		// broadcast has none.
		pl.streams = []string{pipeline.RoomStream(room)}
	}
	pl.messages = func() ([]*message.Message, error) {
		pm.Positions = pl.pos
		for _, sp := range pl.pos {
			pl.res.Positions = append(pl.res.Positions, Position{Stream: sp.Stream, Epoch: sp.Epoch, Pos: sp.Pos})
		}
		msg, err := pipeline.NewPushMessage(push.ID, push.CorrelationID, pm)
		if err != nil {
			return nil, err
		}
		// A room's pushes share a shard, which keeps their order through
		// the broker; a broadcast has no order to keep and goes to any.
		order := push.ID
		if room != "" {
			order = pipeline.RoomStream(room)
		}
		pipeline.SetShard(msg, pipeline.ShardOf(order, len(p.topics)))
		return []*message.Message{msg}, nil
	}
	return pl, nil
}

// run positions and publishes one resolved push.
func (p *Pusher) run(ctx context.Context, pl *plan) (PushResult, error) {
	if err := p.position(ctx, pl); err != nil {
		return PushResult{}, err
	}
	msgs, err := pl.messages()
	if err == nil {
		err = p.send(ctx, msgs...)
	}
	if err != nil {
		p.void(ctx, pl.push, pl.pos)
		return PushResult{}, err
	}
	p.emitOffline(pl.push, pl.offlineMids)
	return pl.res, nil
}

// runBatch positions and publishes resolved pushes: their publishes go to
// the broker in one call, in order. errs holds what failed before (a nil
// plan has one); runBatch fills in the rest. Each push waits for its
// position only on the earlier pushes of the batch that share a stream
// with it, so pushes to one room or user take their positions in batch
// order, and the others' history round trips overlap (at most parallel at
// once).
func (p *Pusher) runBatch(ctx context.Context, plans []*plan, errs []error, parallel int) {
	p.positionAll(ctx, plans, errs, parallel)
	var msgs []*message.Message
	// sent are the plans published, each with its messages' range.
	type span struct{ plan, from, to int }
	sent := make([]span, 0, len(plans))
	for i, pl := range plans {
		if errs[i] != nil {
			continue
		}
		m, err := pl.messages()
		if err != nil {
			errs[i] = err
			p.void(ctx, pl.push, pl.pos)
			continue
		}
		sent = append(sent, span{i, len(msgs), len(msgs) + len(m)})
		msgs = append(msgs, m...)
	}
	// One call a shard: the broker adapter publishes them together (one
	// confirm round on AMQP). A push fails when a shard it has a message
	// on fails: some of its messages may have reached the broker, as with
	// a push to several nodes (README: a 503 may have reached some; a
	// retry with the same Idempotency-Key delivers once); the pushes of
	// the other shards stand.
	sendErrs := p.sendEach(ctx, msgs)
	for _, sp := range sent {
		if err := cmp.Or(sendErrs[sp.from:sp.to]...); err != nil {
			errs[sp.plan] = err
			p.void(ctx, plans[sp.plan].push, plans[sp.plan].pos)
			continue
		}
		p.emitOffline(plans[sp.plan].push, plans[sp.plan].offlineMids)
	}
}

// positionAll positions plans whose errs entry is nil, each after the
// earlier ones sharing a stream with it.
func (p *Pusher) positionAll(ctx context.Context, plans []*plan, errs []error, parallel int) {
	if p.history == nil {
		return
	}
	if parallel <= 1 {
		// In order, one after another: each stream's positions follow
		// the batch's order as they are taken.
		for i, pl := range plans {
			if errs[i] == nil && len(pl.streams) > 0 {
				errs[i] = p.positionSafe(ctx, pl)
			}
		}
		return
	}
	last := map[string]chan struct{}{}
	sem := make(chan struct{}, max(parallel, 1))
	var wg sync.WaitGroup
	for i, pl := range plans {
		if errs[i] != nil || len(pl.streams) == 0 {
			continue
		}
		var after []chan struct{}
		done := make(chan struct{})
		for _, s := range pl.streams {
			if c, ok := last[s]; ok && !slices.Contains(after, c) {
				after = append(after, c)
			}
			last[s] = done
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer close(done)
			for _, c := range after {
				<-c
			}
			sem <- struct{}{}
			defer func() { <-sem }()
			errs[i] = p.positionSafe(ctx, pl)
		}()
	}
	wg.Wait()
}

// positionSafe is position on a batch's goroutines, which no server
// recovers: a panic in a history store fails its push (500, logged)
// instead of the process.
func (p *Pusher) positionSafe(ctx context.Context, pl *plan) (err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("position: panic: %v", v)
		}
	}()
	return p.position(ctx, pl)
}

// position gives a resolved push its positions in its streams.
func (p *Pusher) position(ctx context.Context, pl *plan) error {
	pos, err := p.append(ctx, pl.push, pl.streams, pl.keysOf)
	pl.pos = pos
	return err
}

// userStreams are the user streams of mids, each once and sorted; goim's
// guests of mid 0 share no stream and get none. None without history.
func (p *Pusher) userStreams(mids []int64) []string {
	if p.history == nil {
		return nil
	}
	streams := make([]string, 0, len(mids))
	seen := make(map[int64]bool, len(mids))
	for _, m := range mids {
		if m != 0 && !seen[m] {
			seen[m] = true
			streams = append(streams, pipeline.UserStream(m))
		}
	}
	slices.Sort(streams)
	return streams
}

// byMid indexes user stream positions by their user.
func byMid(pos []*pb.StreamPos) map[int64]*pb.StreamPos {
	if len(pos) == 0 {
		return nil
	}
	out := make(map[int64]*pb.StreamPos, len(pos))
	for _, sp := range pos {
		if m, ok := pipeline.StreamMid(sp.Stream); ok {
			out[m] = sp
		}
	}
	return out
}

// streamKeys are the keys of a key push for the users of streams: an
// Append's entry is one for all its streams, so each user stream of a
// chunk keeps the keys of the chunk's users (a key names one connection,
// so another user's key reaches none of this user's). The usual key push
// is for one user's few keys; the worst, thousands of users of one key
// each, puts at most maxAppendStreams keys (~3.7 KB of 36-byte keys) in
// an entry, and one Append a chunk instead of one per user.
func streamKeys(streams []string, keysOf map[int64][]string) []string {
	var out []string
	for _, s := range streams {
		if m, ok := pipeline.StreamMid(s); ok {
			out = append(out, keysOf[m]...)
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// append gives push its positions in streams, maxAppendStreams a call;
// keysOf (nil: none) gives the keys each call's entry is for. If a call
// fails after earlier ones appended, those are voided: the push is
// answered as not accepted, so no position of it may deliver it.
func (p *Pusher) append(ctx context.Context, push Push, streams []string, keysOf func(streams []string) []string) ([]*pb.StreamPos, error) {
	if p.history == nil || len(streams) == 0 {
		return nil, nil
	}
	e := pipeline.HistoryEntry{ID: push.ID, Op: push.Operation, Body: push.Msg, At: time.Now()}
	out := make([]*pb.StreamPos, 0, len(streams))
	for chunk := range slices.Chunk(streams, maxAppendStreams) {
		if keysOf != nil {
			e.Keys = keysOf(chunk)
		}
		got, err := p.history.Append(ctx, chunk, e, p.limit)
		if err == nil && len(got) != len(chunk) {
			// Whatever it gave cannot be matched to its streams, so
			// cannot be voided either: the store is broken.
			err = fmt.Errorf("%d positions for %d streams", len(got), len(chunk))
		}
		if err != nil {
			p.void(ctx, push, out)
			return nil, fmt.Errorf("%w: position in %d streams: %w", ErrHistory, len(chunk), err)
		}
		for _, sp := range got {
			out = append(out, &pb.StreamPos{Stream: sp.Stream, Epoch: sp.Epoch, Pos: sp.Pos})
		}
	}
	return out, nil
}

// positions renders stream positions for the API's reply.
func positions(byMid map[int64]*pb.StreamPos) []Position {
	if len(byMid) == 0 {
		return nil
	}
	out := make([]Position, 0, len(byMid))
	for _, m := range slices.Sorted(maps.Keys(byMid)) {
		sp := byMid[m]
		out = append(out, Position{Stream: sp.Stream, Epoch: sp.Epoch, Pos: sp.Pos})
	}
	return out
}

// userPositions returns, for a server's keys, the positions of their
// users' streams (each once, in key order).
func userPositions(midOf map[string]int64, pos map[int64]*pb.StreamPos) func(keys []string) []*pb.StreamPos {
	return func(keys []string) []*pb.StreamPos {
		if len(pos) == 0 {
			return nil
		}
		var out []*pb.StreamPos
		seen := map[int64]bool{}
		for _, k := range keys {
			m, ok := midOf[k]
			if !ok || seen[m] {
				continue
			}
			seen[m] = true
			if sp, ok := pos[m]; ok {
				out = append(out, sp)
			}
		}
		return out
	}
}

// void marks positions, given to push before it failed to publish, as
// never accepted: the caller is answered that nothing was, so neither a
// node filling a gap, nor a recovery, nor GET /im/history may give it,
// and a retry takes new positions. It runs past the request's end (on a
// failure the request's context may be what ended), within voidTimeout;
// a failure is logged: those positions then hold a refused message until
// trimmed.
func (p *Pusher) void(ctx context.Context, push Push, pos []*pb.StreamPos) {
	if p.history == nil || len(pos) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), voidTimeout)
	defer cancel()
	ps := make([]pipeline.StreamPos, len(pos))
	for i, sp := range pos {
		ps[i] = pipeline.StreamPos{Stream: sp.Stream, Epoch: sp.Epoch, Pos: sp.Pos}
	}
	for chunk := range slices.Chunk(ps, maxAppendStreams) {
		if err := p.history.Void(ctx, chunk); err != nil {
			if p.voidFail != nil {
				p.voidFail.Log("void the positions of a push that failed to publish; they hold its refused message until trimmed",
					"msg_id", push.ID, "positions", len(ps), "err", err)
			}
			return
		}
	}
}

// serverMessages renders one PUSH message per server holding keys, and
// per push shard (shardOf a key; nil: one shard) when there are several: each user's
// messages keep to one shard. Per-server ids extend the push id in a fixed
// order so that a retried idempotent request reproduces them. byMid, for
// a mid push, lets job find a user's new connections if the ones resolved
// here are gone. positionsOf gives the stream positions a server's PushMsg
// carries: those of the users of its keys.
func serverMessages(push Push, keyServer map[string]string, byMid map[int64]map[string]string, positionsOf func(keys []string) []*pb.StreamPos, shardOf func(key string) int) ([]*message.Message, error) {
	type target struct {
		server string
		shard  int
	}
	byTarget := map[target][]string{}
	for k, s := range keyServer {
		t := target{server: s}
		if shardOf != nil {
			t.shard = shardOf(k)
		}
		byTarget[t] = append(byTarget[t], k)
	}
	targets := slices.SortedFunc(maps.Keys(byTarget), func(a, b target) int {
		return cmp.Or(strings.Compare(a.server, b.server), cmp.Compare(a.shard, b.shard))
	})
	msgs := make([]*message.Message, 0, len(byTarget))
	for _, t := range targets {
		keys := byTarget[t]
		slices.Sort(keys)
		pm := &pb.PushMsg{Type: pb.PushMsg_PUSH, Operation: push.Operation, Server: t.server, Keys: keys, Msg: push.Msg, Positions: positionsOf(keys)}
		id := push.ID + "/" + t.server
		if shardOf != nil {
			// Node ids are free text: the length keeps node "a/1" of
			// shard 0 and node "a" of shard 1 apart. Unsharded, the id a
			// push always had.
			id = push.ID + "/" + strconv.Itoa(len(t.server)) + ":" + t.server + "/" + strconv.Itoa(t.shard)
		}
		msg, err := pipeline.NewPushMessage(id, push.CorrelationID, pm)
		if err != nil {
			return nil, err
		}
		pipeline.SetMidKeys(msg, keys, byMid)
		pipeline.SetShard(msg, t.shard)
		msgs = append(msgs, msg)
	}
	return msgs, nil
}

// keyShard is the push shard of a key: its user's stream's, or for a
// guest of mid 0, who has no stream, its own; nil when unsharded.
func (p *Pusher) keyShard(midOf map[string]int64) func(key string) int {
	n := len(p.topics)
	if n <= 1 {
		return nil
	}
	return func(key string) int {
		if m := midOf[key]; m != 0 {
			return pipeline.ShardOf(pipeline.UserStream(m), n)
		}
		return pipeline.ShardOf("key:"+key, n)
	}
}

// send publishes msgs, each to its shard (pipeline.SetShard); those of a
// shard in one call, in their order; the shards' calls at once.
func (p *Pusher) send(ctx context.Context, msgs ...*message.Message) error {
	for _, err := range p.sendEach(ctx, msgs) {
		if err != nil {
			return err
		}
	}
	return nil
}

// sendEach is send answering for each message: a shard the broker refused
// (full, say) fails its own messages, not the other shards'.
func (p *Pusher) sendEach(ctx context.Context, msgs []*message.Message) []error {
	errs := make([]error, len(msgs))
	if len(msgs) == 0 {
		return errs
	}
	for _, m := range msgs {
		m.SetContext(ctx)
	}
	start := time.Now()
	p.publish(msgs, errs)
	p.metrics.Published(time.Since(start))
	return errs
}

// publish sends msgs, each to its shard, filling errs: the messages of a
// shard in one call, in their order; the shards' calls at once.
func (p *Pusher) publish(msgs []*message.Message, errs []error) {
	if len(p.topics) == 1 {
		// Unsharded, the hot path: no grouping to pay for. Shards are
		// set from len(p.topics), so every message is shard 0.
		for _, m := range msgs {
			pipeline.TakeShard(m)
		}
		if err := p.publishTo(p.topics[0], msgs); err != nil {
			for i := range errs {
				errs[i] = err
			}
		}
		return
	}
	byShard := map[int][]int{}
	for i, m := range msgs {
		s := pipeline.TakeShard(m)
		if s >= len(p.topics) {
			errs[i] = fmt.Errorf("%w: push shard %d of %d", ErrBroker, s, len(p.topics))
			continue
		}
		byShard[s] = append(byShard[s], i)
	}
	one := func(s int, idx []int) {
		batch := make([]*message.Message, len(idx))
		for j, i := range idx {
			batch[j] = msgs[i]
		}
		if err := p.publishTo(p.topics[s], batch); err != nil {
			for _, i := range idx {
				errs[i] = err
			}
		}
	}
	if len(byShard) == 1 {
		for s, idx := range byShard {
			one(s, idx)
		}
		return
	}
	var wg sync.WaitGroup
	for s, idx := range byShard {
		wg.Go(func() { one(s, idx) })
	}
	wg.Wait()
}

func (p *Pusher) publishTo(topic string, msgs []*message.Message) error {
	if err := p.publisher.Publish(topic, msgs...); err != nil {
		return fmt.Errorf("%w: publish to %s: %w", ErrBroker, topic, err)
	}
	return nil
}

// nodeLister lists the live cloud nodes; NodesWith may look again when
// ids are not among them (nodecache.Cache).
type nodeLister interface {
	Nodes(ctx context.Context) ([]*pb.NodeInfo, error)
	NodesWith(ctx context.Context, ids []string) ([]*pb.NodeInfo, error)
}

// registryNodes reads the registry on every call.
type registryNodes struct{ r pipeline.Registry }

func (n registryNodes) Nodes(ctx context.Context) ([]*pb.NodeInfo, error) { return n.r.Nodes(ctx) }
func (n registryNodes) NodesWith(ctx context.Context, _ []string) ([]*pb.NodeInfo, error) {
	return n.r.Nodes(ctx)
}

// newNodeLister keeps the registry's node list for ttl; 0 reads it every
// time.
func newNodeLister(r pipeline.Registry, ttl time.Duration) nodeLister {
	if ttl <= 0 {
		return registryNodes{r}
	}
	return nodecache.New(r, ttl, nil)
}

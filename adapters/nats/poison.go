package nats

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ThreeDotsLabs/watermill/message"
	nc "github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"imcloud/adapters/internal/settle"
	"imcloud/pipeline"
)

// PoisonStream lists, replays and purges the messages of a poison stream
// (pipeline.PoisonAdmin). The stream is a work queue like every topic's,
// so it is read by sequence (GetMsg, next for the subject) rather than
// through a consumer: a second consumer on a work queue would take the
// messages of any business consumer of the poison topic, and what it
// acks is gone. Purge deletes by sequence (DeleteMsg).
//
// Replay publishes each message with a JetStream message id naming its
// place in the poison stream, then deletes it: two admins racing on one
// message publish the same id within the target's duplicate window (two
// minutes by default), JetStream stores it once and the loser, told it
// was a duplicate, does not count it. A replay that read a message just
// before another admin purged it may still replay it; the purge then
// counts it too.
//
// A message's key is its stream sequence, which JetStream assigns.
//
// Each message goes to the push shard pipeline.ReplayTargets.For picks;
// admins racing on it pick the same one (and so the same duplicate
// window) when opened with the same targets, as every process of a
// cluster is.
type PoisonStream struct {
	conn    *nc.Conn
	js      jetstream.JetStream
	streams *streams
	stream  string // stream name
	// targets are topic names, as For compares them with the recorded
	// topic: streamName maps each to its stream.
	targets pipeline.ReplayTargets
}

var _ pipeline.PoisonAdmin = (*PoisonStream)(nil)

// settleTimeout bounds the delete that follows a replay's publish once the
// caller's context is done; one DeleteMsg takes about a millisecond on the
// local server.
const settleTimeout = 10 * time.Second

// NewPoisonStream opens the poison stream of topic poison, whose messages
// Replay re-publishes to targets (pipeline.ReplayTargets.For picks one per
// message); streams it creates get limits.
func NewPoisonStream(url, poison string, targets pipeline.ReplayTargets, limits Limits) (*PoisonStream, error) {
	if err := targets.Check(); err != nil {
		return nil, fmt.Errorf("poison stream of %s: %w", poison, err)
	}
	conn, js, err := connect(url, "imcloud-poison")
	if err != nil {
		return nil, err
	}
	s := &PoisonStream{conn: conn, js: js, streams: newStreams(js, limits), stream: streamName(poison), targets: slices.Clone(targets)}
	// The poison stream is made now, as a publisher would, so that what
	// is published to its topic from here on is kept.
	ctx, cancel := context.WithTimeout(context.Background(), settle.DefaultTiming().ConfirmTimeout)
	defer cancel()
	if _, err := s.streams.get(ctx, s.stream); err != nil {
		conn.Close()
		return nil, err
	}
	return s, nil
}

// List returns up to limit messages after the sequence after, oldest
// first: one GetMsg each, limit+1 in all (the last says whether more
// remain).
func (s *PoisonStream) List(ctx context.Context, after string, limit int) ([]pipeline.Poisoned, bool, error) {
	limit = max(limit, 1)
	var from uint64 = 1
	if after != "" {
		n, err := strconv.ParseUint(after, 10, 64)
		if err != nil {
			return nil, false, fmt.Errorf("list %s after %q: %w (a stream sequence)", s.stream, after, pipeline.ErrBadKey)
		}
		from = n + 1
	}
	st, err := s.streams.get(ctx, s.stream)
	if err != nil {
		return nil, false, err
	}
	var out []pipeline.Poisoned
	for seq := from; ; {
		m, err := st.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(s.stream))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out, false, nil
		}
		if err != nil {
			return nil, false, fmt.Errorf("read %s from %d: %w", s.stream, seq, err)
		}
		if len(out) == limit {
			return out, true, nil
		}
		out = append(out, decode(m))
		seq = m.Sequence + 1
	}
}

// Purge deletes the selected messages; one already deleted is not counted.
func (s *PoisonStream) Purge(ctx context.Context, sel pipeline.Selector) (int, error) {
	n := 0
	err := s.each(ctx, func(p pipeline.Poisoned, m *jetstream.RawStreamMsg, _ string) error {
		if !sel(p) {
			return nil
		}
		gone, err := s.delete(ctx, m.Sequence)
		if gone {
			n++
		}
		return err
	})
	return n, err
}

// Replay publishes the selected messages, each to its target's stream,
// and deletes each once JetStream stored it. Every target's stream is
// made first, with its limit, as a publisher would make it.
func (s *PoisonStream) Replay(ctx context.Context, sel pipeline.Selector) (pipeline.Replayed, error) {
	done := pipeline.Replayed{}
	for _, t := range s.targets {
		if _, err := s.streams.get(ctx, streamName(t)); err != nil {
			return done, fmt.Errorf("replay: %w", err)
		}
	}
	var undecodable []string
	err := s.each(ctx, func(p pipeline.Poisoned, m *jetstream.RawStreamMsg, replayID string) error {
		if !sel(p) {
			return nil
		}
		if p.Undecodable != "" {
			undecodable = append(undecodable, p.Key)
			return nil
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		to := s.targets.For(p)
		dup, err := s.publish(ctx, streamName(to), p.Replayable(ctx), replayID)
		if err != nil {
			return fmt.Errorf("replay %s to %s: %w", p.Key, to, err)
		}
		if !dup {
			done[to]++
		}
		// Published: the delete must not be cut by the caller's cancel,
		// or the message stays poisoned and a replay after the target's
		// duplicate window publishes it again.
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), settleTimeout)
		defer cancel()
		_, err = s.delete(dctx, m.Sequence)
		return err
	})
	if err != nil {
		return done, err
	}
	return done, pipeline.LeftUndecodable(undecodable)
}

// publish publishes msg to the stream named subject (a stream's subject
// is its name) with JetStream message id id, and says whether JetStream
// had it already.
func (s *PoisonStream) publish(ctx context.Context, subject string, msg *message.Message, id string) (duplicate bool, err error) {
	m := nc.NewMsg(subject)
	m.Header.Set(uuidHeader, msg.UUID)
	for k, v := range msg.Metadata {
		m.Header.Set(k, v)
	}
	m.Data = msg.Payload
	ack, err := s.js.PublishMsg(ctx, m, jetstream.WithMsgID(id))
	if err != nil {
		var ae *jetstream.APIError
		if errors.As(err, &ae) && ae.ErrorCode == jsStoreFailed {
			err = fmt.Errorf("%w: %w", ErrQueueFull, err)
		}
		return false, err
	}
	return ack.Duplicate, nil
}

// delete deletes seq from the poison stream; gone says this call did.
func (s *PoisonStream) delete(ctx context.Context, seq uint64) (gone bool, err error) {
	st, err := s.streams.get(ctx, s.stream)
	if err != nil {
		return false, err
	}
	if err := st.DeleteMsg(ctx, seq); err != nil {
		// The client renders the server's reason into the message.
		if errors.Is(err, jetstream.ErrMsgNotFound) || errors.Is(err, jetstream.ErrMsgDeleteUnsuccessful) && strings.Contains(err.Error(), "no message found") {
			return false, nil
		}
		return false, fmt.Errorf("delete %d of %s: %w", seq, s.stream, err)
	}
	return true, nil
}

// each reads the stream's messages up to its last at the call, oldest
// first, and calls fn with each, as stored and decoded, and the JetStream
// message id its replay publishes with.
func (s *PoisonStream) each(ctx context.Context, fn func(p pipeline.Poisoned, m *jetstream.RawStreamMsg, replayID string) error) error {
	st, err := s.streams.get(ctx, s.stream)
	if err != nil {
		return err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return fmt.Errorf("stream %s: %w", s.stream, err)
	}
	if info.State.Msgs == 0 {
		return nil
	}
	// The stream's creation time tells a stream deleted and made again,
	// whose sequences start over, from the one whose messages were
	// replayed before.
	prefix := fmt.Sprintf("imcloud-replay:%s:%d:", s.stream, info.Created.UnixNano())
	last := info.State.LastSeq
	for seq := info.State.FirstSeq; seq <= last; {
		m, err := st.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(s.stream))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read %s from %d: %w", s.stream, seq, err)
		}
		if m.Sequence > last {
			return nil
		}
		if err := fn(decode(m), m, prefix+strconv.FormatUint(m.Sequence, 10)); err != nil {
			return err
		}
		seq = m.Sequence + 1
	}
	return nil
}

// decode reads a stored message as Publisher wrote it: a message without
// its UUID header was not, and is described as undecodable.
func decode(m *jetstream.RawStreamMsg) pipeline.Poisoned {
	uuid := m.Header.Get(uuidHeader)
	if uuid == "" {
		return pipeline.NewUndecodable(strconv.FormatUint(m.Sequence, 10), m.Data, m.Time,
			fmt.Errorf("nats message %d of %s has no %s header: not written by imcloud's publisher", m.Sequence, m.Subject, uuidHeader))
	}
	msg := message.NewMessage(uuid, m.Data)
	for k, vs := range m.Header {
		if k != uuidHeader && k != jetstream.MsgIDHeader && len(vs) > 0 {
			msg.Metadata.Set(k, vs[0])
		}
	}
	return pipeline.NewPoisoned(strconv.FormatUint(m.Sequence, 10), msg, m.Time)
}

// Close closes the connection.
func (s *PoisonStream) Close() error {
	s.conn.Close()
	return nil
}

// Depth is how many messages the poison stream holds.
func (s *PoisonStream) Depth(ctx context.Context) (int64, error) {
	st, err := s.streams.get(ctx, s.stream)
	if err != nil {
		return 0, err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return 0, fmt.Errorf("stream %s: %w", s.stream, err)
	}
	return int64(info.State.Msgs), nil
}

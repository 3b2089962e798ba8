package wire

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"unicode/utf8"
)

// StreamPos is a client's last position in a stream: an entry of a
// recover request, or of the auth reply of a connection that opted in.
type StreamPos struct {
	Stream string `json:"stream"`
	Epoch  string `json:"epoch"`
	Pos    uint64 `json:"pos"`
}

// RecoverRequest is the OpRecover body.
type RecoverRequest struct {
	Streams []StreamPos `json:"streams"`
}

// Why a stream was not recovered (RecoverResult.Reason).
const (
	// ReasonEpoch: the stream's history was lost since the client's
	// position was given (its epoch is not the stream's).
	ReasonEpoch = "epoch"
	// ReasonTrimmed: messages after the client's position are no longer
	// kept.
	ReasonTrimmed = "trimmed"
	// ReasonFuture: the position is past the stream's last one.
	ReasonFuture = "future"
	// ReasonForbidden: the connection does not receive this stream: a room
	// it is not in, or another user's stream.
	ReasonForbidden = "forbidden"
	// ReasonNoHistory: the stream's class keeps no history (size 0) and
	// messages were missed.
	ReasonNoHistory = "no_history"
)

// RecoverResult answers one stream of a recover request. Epoch and Pos are
// the stream's current epoch and the position after which the connection
// receives it live: when Recovered, the missed messages up to Pos follow
// the reply; when not, nothing before Pos will (the client resyncs).
type RecoverResult struct {
	Stream    string `json:"stream"`
	Recovered bool   `json:"recovered"`
	Reason    string `json:"reason,omitempty"`
	Epoch     string `json:"epoch"`
	Pos       uint64 `json:"pos"`
}

// RecoverReply is the OpRecoverReply body, one result per requested
// stream, in the order of the request.
type RecoverReply struct {
	Streams []RecoverResult `json:"streams"`
}

// AppendRecoverRequest appends the JSON of an OpRecover body to dst.
func AppendRecoverRequest(dst []byte, streams []StreamPos) ([]byte, error) {
	if streams == nil {
		streams = []StreamPos{}
	}
	b, err := json.Marshal(RecoverRequest{Streams: streams})
	if err != nil {
		return dst, fmt.Errorf("encode recover request: %w", err)
	}
	return append(dst, b...), nil
}

// AppendRecoverReply appends the JSON of an OpRecoverReply body to dst.
func AppendRecoverReply(dst []byte, results []RecoverResult) ([]byte, error) {
	if results == nil {
		results = []RecoverResult{}
	}
	b, err := json.Marshal(RecoverReply{Streams: results})
	if err != nil {
		return dst, fmt.Errorf("encode recover reply: %w", err)
	}
	return append(dst, b...), nil
}

// DecodeRecoverReply decodes an OpRecoverReply body. It is the client's
// side: members it does not know are skipped, so a newer server may add
// some.
func DecodeRecoverReply(b []byte) (RecoverReply, error) {
	var r RecoverReply
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("decode recover reply: %w", err)
	}
	for _, s := range r.Streams {
		if s.Stream == "" {
			return r, errors.New("decode recover reply: a result without its stream")
		}
	}
	return r, nil
}

// DecodeRecoverRequest decodes an OpRecover body strictly, as hostile
// input: at most MaxRecoverBytes of UTF-8 holding exactly
// {"streams":[{"stream":…,"epoch":…,"pos":…},…]} — every member once,
// names exact (case matters), nothing else, nothing after — with at most
// MaxRecoverStreams entries, each stream valid (ValidStream) and named
// once, each epoch valid (ValidEpoch), each position an integer 0 to
// MaxPos (0: nothing of that epoch was received). Every error wraps
// ErrRecover: the client broke the protocol.
func DecodeRecoverRequest(b []byte) ([]StreamPos, error) {
	if len(b) > MaxRecoverBytes {
		return nil, fmt.Errorf("%w: %d bytes, at most %d", ErrRecover, len(b), MaxRecoverBytes)
	}
	// encoding/json would turn invalid UTF-8 into U+FFFD, letting two
	// byte strings name one stream.
	if !utf8.Valid(b) {
		return nil, fmt.Errorf("%w: not UTF-8", ErrRecover)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	streams, err := recoverObject(d)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrRecover, err)
	}
	if _, err := d.Token(); err != io.EOF {
		return nil, fmt.Errorf("%w: data after the object", ErrRecover)
	}
	return streams, nil
}

func recoverObject(d *json.Decoder) ([]StreamPos, error) {
	if err := delim(d, '{'); err != nil {
		return nil, err
	}
	var streams []StreamPos
	seen := false
	for d.More() {
		name, err := memberName(d)
		if err != nil {
			return nil, err
		}
		if name != "streams" || seen {
			return nil, fmt.Errorf("member %q: want \"streams\" once", name)
		}
		seen = true
		if streams, err = recoverList(d); err != nil {
			return nil, err
		}
	}
	if !seen {
		return nil, errors.New(`no "streams"`)
	}
	return streams, delim(d, '}')
}

func recoverList(d *json.Decoder) ([]StreamPos, error) {
	if err := delim(d, '['); err != nil {
		return nil, fmt.Errorf("streams: %w", err)
	}
	streams := []StreamPos{}
	for d.More() {
		if len(streams) == MaxRecoverStreams {
			return nil, fmt.Errorf("more than %d streams", MaxRecoverStreams)
		}
		sp, err := recoverEntry(d)
		if err != nil {
			return nil, fmt.Errorf("streams[%d]: %w", len(streams), err)
		}
		for _, o := range streams {
			if o.Stream == sp.Stream {
				return nil, fmt.Errorf("streams[%d]: stream %q appears twice", len(streams), sp.Stream)
			}
		}
		streams = append(streams, sp)
	}
	return streams, delim(d, ']')
}

func recoverEntry(d *json.Decoder) (StreamPos, error) {
	var sp StreamPos
	if err := delim(d, '{'); err != nil {
		return sp, err
	}
	var have [3]bool // stream, epoch, pos
	for d.More() {
		name, err := memberName(d)
		if err != nil {
			return sp, err
		}
		var i int
		switch name {
		case "stream":
			i = 0
		case "epoch":
			i = 1
		case "pos":
			i = 2
		default:
			return sp, fmt.Errorf("unknown member %q", name)
		}
		if have[i] {
			return sp, fmt.Errorf("member %q appears twice", name)
		}
		have[i] = true
		tok, err := d.Token()
		if err != nil {
			return sp, fmt.Errorf("%s: %w", name, err)
		}
		switch i {
		case 0:
			s, ok := tok.(string)
			if !ok {
				return sp, errors.New("stream is not a string")
			}
			if err := ValidStream(s); err != nil {
				return sp, err
			}
			sp.Stream = s
		case 1:
			s, ok := tok.(string)
			if !ok {
				return sp, errors.New("epoch is not a string")
			}
			if err := ValidEpoch(s); err != nil {
				return sp, err
			}
			sp.Epoch = s
		case 2:
			n, ok := tok.(json.Number)
			if !ok {
				return sp, errors.New("pos is not a number")
			}
			// ParseUint refuses signs, fractions and exponents.
			pos, err := strconv.ParseUint(string(n), 10, 64)
			if err != nil || pos > MaxPos {
				return sp, fmt.Errorf("pos %s: want an integer 0 to %d", n, uint64(MaxPos))
			}
			sp.Pos = pos
		}
	}
	if !have[0] || !have[1] || !have[2] {
		return sp, errors.New(`want "stream", "epoch" and "pos"`)
	}
	return sp, delim(d, '}')
}

func memberName(d *json.Decoder) (string, error) {
	tok, err := d.Token()
	if err != nil {
		return "", err
	}
	s, ok := tok.(string)
	if !ok {
		return "", fmt.Errorf("member name is %v", tok)
	}
	return s, nil
}

func delim(d *json.Decoder, want json.Delim) error {
	tok, err := d.Token()
	if err != nil {
		return err
	}
	if got, ok := tok.(json.Delim); !ok || got != want {
		return fmt.Errorf("want %q, got %v", want, tok)
	}
	return nil
}

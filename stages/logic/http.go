package logic

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/google/uuid"
)

// reply is the envelope of every HTTP answer.
type reply struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Data    any    `json:"data,omitempty"`
}

func writeJSON(w http.ResponseWriter, status int, r reply) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(r)
}

func writeError(w http.ResponseWriter, status int, msg string) {
	writeJSON(w, status, reply{Code: -status, Message: msg})
}

// paramError is a bad request naming its field.
type paramError struct {
	field, problem string
}

func (e *paramError) Error() string { return e.field + ": " + e.problem }

func badParam(field, format string, args ...any) error {
	return &paramError{field: field, problem: fmt.Sprintf(format, args...)}
}

// params are a push request's fields, from the query string or a JSON body.
type params struct {
	values url.Values
	json   map[string]json.RawMessage
	msg    []byte
}

// has reports whether field was given in either form.
func (p *params) has(field string) bool {
	_, inJSON := p.json[field]
	return inJSON || p.values.Has(field)
}

// strings returns a repeated field; JSON may give a list or one value.
func (p *params) strings(field string) ([]string, error) {
	if raw, ok := p.json[field]; ok {
		var list []json.RawMessage
		if err := json.Unmarshal(raw, &list); err != nil {
			list = []json.RawMessage{raw}
		}
		out := make([]string, 0, len(list))
		for _, item := range list {
			s, err := scalar(item)
			if err != nil {
				return nil, badParam(field, "want a string or number, or a list of them")
			}
			out = append(out, s)
		}
		return out, nil
	}
	return p.values[field], nil
}

// scalar renders a JSON string or number as text.
func scalar(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err != nil {
		return "", err
	}
	return n.String(), nil
}

func (p *params) string(field string) (string, error) {
	vs, err := p.strings(field)
	if err != nil {
		return "", err
	}
	if len(vs) > 1 {
		return "", badParam(field, "given %d times, want once", len(vs))
	}
	if len(vs) == 0 {
		return "", nil
	}
	return vs[0], nil
}

func (p *params) requiredString(field string) (string, error) {
	s, err := p.string(field)
	if err != nil {
		return "", err
	}
	if strings.TrimSpace(s) == "" {
		return "", badParam(field, "required")
	}
	return s, nil
}

func (p *params) int(field string, bits int, min, max int64) (int64, error) {
	s, err := p.requiredString(field)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, bits)
	if err != nil || n < min || n > max {
		return 0, badParam(field, "want an integer from %d to %d, got %q", min, max, s)
	}
	return n, nil
}

func (p *params) operation() (int32, error) {
	op, err := p.int("operation", 32, 1000, math.MaxInt32)
	return int32(op), err
}

// readParams reads the request in either API form. The message is the raw
// body, or the JSON body's msg: a JSON string as its text, anything else
// as its encoding.
func readParams(r *http.Request, maxMsg int) (*params, error) {
	p := &params{values: r.URL.Query()}
	// The JSON form wraps the message, so allow room for the fields around it.
	limit := int64(maxMsg)
	isJSON := false
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err == nil && mt == "application/json" {
		isJSON = true
		limit = int64(maxMsg)*6 + 64<<10
	}
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, limit))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		return nil, errTooLarge
	}
	if err != nil {
		return nil, fmt.Errorf("read body: %w", err)
	}
	if !isJSON {
		p.msg = body
	} else {
		dec := json.NewDecoder(bytes.NewReader(body))
		if err := dec.Decode(&p.json); err != nil || p.json == nil {
			return nil, badParam("body", "want a JSON object")
		}
		allowed := map[string]bool{"operation": true, "keys": true, "mids": true, "type": true, "room": true, "speed": true, "msg": true}
		for f := range p.json {
			if !allowed[f] {
				return nil, badParam(f, "unknown field")
			}
		}
		raw, ok := p.json["msg"]
		if !ok {
			return nil, badParam("msg", "required in a JSON body")
		}
		var s string
		if err := json.Unmarshal(raw, &s); err == nil {
			p.msg = []byte(s)
		} else {
			p.msg = bytes.TrimSpace(raw)
		}
	}
	if len(p.msg) > maxMsg {
		return nil, errTooLarge
	}
	return p, nil
}

var errTooLarge = errors.New("message too large")

// pushRoute validates a request's parameters and publishes the push.
type pushRoute func(ctx context.Context, push Push, p *params) (PushResult, error)

func (st *Stage) push(name string, route pushRoute) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !st.authorized(r) {
			writeError(w, http.StatusUnauthorized, "missing or wrong API key (Authorization: Bearer <key>)")
			return
		}
		p, err := readParams(r, st.cfg.MaxMessageBytes)
		if errors.Is(err, errTooLarge) {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("msg: larger than %d bytes", st.cfg.MaxMessageBytes))
			return
		}
		var perr *paramError
		if errors.As(err, &perr) {
			writeError(w, http.StatusBadRequest, perr.Error())
			return
		}
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		op, err := p.operation()
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		corr := r.Header.Get("X-Request-ID")
		if corr == "" {
			corr = uuid.NewString()
		}
		idemKey := r.Header.Get("Idempotency-Key")
		storeKey := name + "\x00" + idemKey
		if idemKey != "" && st.replies != nil {
			if prev, ok, err := st.replies.Reply(r.Context(), storeKey); err != nil {
				st.logger.WarnContext(r.Context(), "idempotency store unavailable", "err", err)
			} else if ok {
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Idempotent-Replayed", "true")
				_, _ = w.Write(prev)
				return
			}
		}
		push := Push{
			ID:            MessageID(idemKey, name),
			CorrelationID: corr,
			Operation:     op,
			Msg:           p.msg,
		}
		res, err := route(r.Context(), push, p)
		switch {
		case errors.As(err, &perr):
			writeError(w, http.StatusBadRequest, perr.Error())
		case errors.Is(err, ErrBroker):
			st.logger.ErrorContext(r.Context(), "push not accepted", "route", name, "correlation_id", corr, "err", err)
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "broker unavailable, retry later")
		case err != nil:
			st.logger.ErrorContext(r.Context(), "push failed", "route", name, "correlation_id", corr, "err", err)
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, "registry unavailable, retry later")
		default:
			body, _ := json.Marshal(reply{Code: 0, Message: "ok", Data: res})
			body = append(body, '\n')
			if idemKey != "" && st.replies != nil {
				if err := st.replies.SaveReply(r.Context(), storeKey, body); err != nil {
					st.logger.WarnContext(r.Context(), "remember idempotent reply", "err", err)
				}
			}
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(body)
		}
	})
}

func (st *Stage) authorized(r *http.Request) bool {
	if len(st.cfg.APIKeys) == 0 {
		return true
	}
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok {
		return false
	}
	match := 0
	for _, k := range st.cfg.APIKeys {
		match |= subtle.ConstantTimeCompare([]byte(got), []byte(k))
	}
	return match == 1
}

func (st *Stage) pushKeys(ctx context.Context, push Push, p *params) (PushResult, error) {
	keys, err := p.strings("keys")
	if err != nil {
		return PushResult{}, err
	}
	if len(keys) == 0 {
		return PushResult{}, badParam("keys", "required")
	}
	for _, k := range keys {
		if k == "" {
			return PushResult{}, badParam("keys", "empty key")
		}
	}
	return st.pusher.PushKeys(ctx, push, keys)
}

func (st *Stage) pushMids(ctx context.Context, push Push, p *params) (PushResult, error) {
	raw, err := p.strings("mids")
	if err != nil {
		return PushResult{}, err
	}
	if len(raw) == 0 {
		return PushResult{}, badParam("mids", "required")
	}
	mids := make([]int64, 0, len(raw))
	for _, s := range raw {
		m, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
		if err != nil || m <= 0 {
			return PushResult{}, badParam("mids", "want positive integers, got %q", s)
		}
		mids = append(mids, m)
	}
	return st.pusher.PushMids(ctx, push, mids)
}

func (st *Stage) pushRoom(ctx context.Context, push Push, p *params) (PushResult, error) {
	typ, err := p.requiredString("type")
	if err != nil {
		return PushResult{}, err
	}
	room, err := p.requiredString("room")
	if err != nil {
		return PushResult{}, err
	}
	return st.pusher.PushRoom(ctx, push, RoomKey(typ, room))
}

func (st *Stage) pushAll(ctx context.Context, push Push, p *params) (PushResult, error) {
	var speed int64
	if p.has("speed") {
		var err error
		if speed, err = p.int("speed", 32, 0, math.MaxInt32); err != nil {
			return PushResult{}, err
		}
	}
	return st.pusher.PushAll(ctx, push, int32(speed))
}

// RoomKey is the room id clients join: type://room.
func RoomKey(typ, room string) string { return typ + "://" + room }
